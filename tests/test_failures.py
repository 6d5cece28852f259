"""train.py against a full disk (a real tmpfs filled during training) and against a second process on
the same run folder, with a supervisor SIGKILLed under it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import REPO_ROOT, tiny_overrides, cli_flags

TIMEOUT_S = 300

# Runs inside the mount namespace when it has to: mounts a tmpfs for the runs folder, starts
# train.py, fills the disk completely once the first checkpoint is published, lets the run
# stop, frees the disk, reruns the same command, and writes what happened to a JSON file.
FULL_DISK_DRIVER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from pathlib import Path
    disk, result_path, command = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    result = {}
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        checkpoints = disk / "runs" / "full" / "checkpoints"
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("ckpt-*.manifest.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(disk / "filler", "wb") as fh:  # another program fills the disk
            try:
                while True:
                    fh.write(bytes(1 << 16))
                    fh.flush()
            except OSError as err:
                result["filled"] = str(err)
        out, err = proc.communicate(timeout=300)
        run_json = disk / "runs" / "full" / "run.json"
        result["first"] = {"code": proc.returncode, "out": out, "err": err, "status": json.loads(run_json.read_text())["status"],
                           "manifests": sorted(p.name for p in checkpoints.glob("*.manifest.json"))}
        (disk / "filler").unlink()
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        result["second"] = {"code": again.returncode, "out": again.stdout, "err": again.stderr,
                            "status": json.loads(run_json.read_text())["status"]}
    finally:
        result_path.write_text(json.dumps(result))
        subprocess.run(["umount", str(disk)])
    """
)


def _run_with_tmpfs(driver_args: list[str]) -> subprocess.CompletedProcess:
    """Run the driver where it may mount a tmpfs: directly (root), else in a user+mount namespace."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    attempts = [[sys.executable, "-c", FULL_DISK_DRIVER, *driver_args]]
    if shutil.which("unshare"):
        attempts.append(["unshare", "--user", "--map-root-user", "--mount", *attempts[0]])
    for command in attempts:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=2 * TIMEOUT_S)
        if "mount" not in done.stderr or done.returncode == 0:
            return done
    pytest.skip(f"cannot mount a tmpfs here (needs root or unprivileged user namespaces): {done.stderr[-300:]}")


def test_a_full_disk_is_a_clean_stop_and_the_rerun_resumes(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # No attention images in TensorBoard: they would spend the 3 MB disk the test fills and frees.
    overrides = tiny_overrides(tmp_path, epochs=3, checkpoint_every=3, run_name="full", runs_dir=disk / "runs", tensorboard_images=0)
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--preset", "minimal", *cli_flags(overrides), "--no-meteor"]
    done = _run_with_tmpfs([str(disk), str(tmp_path / "result.json"), json.dumps(command)])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    first, second = result["first"], result["second"]
    assert "No space left" in result["filled"]

    # One clear line, the documented exit code (--max-restarts does not rerun it), the reason in run.json.
    assert first["code"] == 4, first["err"][-3000:]
    assert "Traceback" not in first["err"] and "error: Training stopped: the disk is full" in first["err"]
    assert "Free disk space and rerun the same command to resume" in first["err"]
    assert first["status"] == "stopped: disk full" and first["manifests"]
    last_good = first["manifests"][-1].split(".")[0]
    assert f"Last good checkpoint: {disk / 'runs' / 'full' / 'checkpoints' / last_good}" in first["err"]

    assert second["code"] == 0, second["err"][-3000:]
    assert f"Resuming from {disk / 'runs' / 'full' / 'checkpoints' / last_good}:" in second["out"]
    assert second["status"] == "complete" and "Traceback" not in second["err"]


def _wait_for(predicate, what: str, proc=None):
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert proc is None or proc.poll() is None, f"the process ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _flock_is_free(path) -> bool:
    import fcntl

    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_one_training_per_run_folder_and_no_orphan_after_a_killed_supervisor(tmp_path):
    overrides = tiny_overrides(tmp_path, epochs=60, checkpoint_every=5, run_name="busy")
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--preset", "minimal", *cli_flags(overrides), "--no-meteor"]
    run_dir, lock = tmp_path / "runs" / "busy", tmp_path / "runs" / "busy.lock"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(tmp_path / "supervisor.log", "w") as log:
        supervisor = subprocess.Popen([*command, "--max-restarts", "2"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        history = run_dir / "history.csv"
        _wait_for(lambda: history.exists() and len(history.read_text().splitlines()) >= 2, "the first epoch", supervisor)
        child = int(lock.read_text().split()[0])
        assert child != supervisor.pid and psutil.Process(child).ppid() == supervisor.pid

        second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIMEOUT_S)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"{run_dir} is in use: another training process (PID {child})" in second.stderr
        assert "Traceback" not in second.stderr and "disk" not in second.stderr
        header = history.read_text().splitlines()[0]
        assert history.read_text().splitlines().count(header) == 1  # nothing written by the second process

        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(TIMEOUT_S)
        # Not "the child is a zombie": its leader thread turns zombie while TensorFlow's other
        # threads are still exiting, and the kernel drops the flock only when the last one has.
        _wait_for(lambda: _flock_is_free(lock), "the child to die and the kernel to release its lock")
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    # The dead child's lock is taken over by the next process, which says whose it was.
    assert lock.read_text().split()[0] == str(child)
    take_over = subprocess.run(
        [sys.executable, "-c", f"from caption_tf.run_folder import locked_run\nwith locked_run({str(run_dir)!r}): print('locked')"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert take_over.returncode == 0, take_over.stderr
    assert f"Taking over the lock {lock} of PID {child}, which is no longer running" in take_over.stdout and "locked" in take_over.stdout
    assert lock.read_text() == ""  # released: nobody holds it
