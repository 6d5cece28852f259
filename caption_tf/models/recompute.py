"""Gradient checkpointing that also saves memory inside a compiled (graph/XLA) train step.

`tf.recompute_grad` replays the function from its inputs during the backward pass.
Inside a `tf.function` the replay depends on nothing but those inputs, so the graph
executor is free to run it as soon as they exist, i.e. during the forward pass (and
Grappler may merge it with the forward ops): the activations then live until the
backward pass anyway. Here the replay's inputs pass through `tf.identity` ops with a
control dependency on the incoming gradients, so it can only run when the backward pass
reaches this block.

Replaying alone did not lower the decoder's peak (benchmarks/bench_memory.py): the peak was
the per-step gradients of weights and shared tensors waiting to be summed.
`CaptionDecoder.checkpointed_loss` therefore also passes those tensors through the blocks
as inputs/outputs, so their gradients are summed along the chain of blocks.

The function must be deterministic (no dropout inside: a replay would draw new masks).

Example:

```python
step = recompute_grad(lambda x, h: dense(tf.concat([x, h], -1)))
with tf.GradientTape() as tape:
    loss = tf.reduce_sum(step(x, h))
grads = tape.gradient(loss, dense.trainable_variables)   # same as without recompute_grad
```
"""

from __future__ import annotations

import tensorflow as tf


def recompute_grad(fn):
    """`fn(*tensors) -> tensor or tuple of tensors`, with activations recomputed in the backward pass."""

    @tf.custom_gradient
    def wrapped(*args):
        result = fn(*args)

        def grad_fn(*upstream, variables=None):
            variables = list(variables or [])
            # Not before the gradient of this step's outputs exists: keeps the replay in the backward pass.
            with tf.control_dependencies([g for g in upstream if g is not None]):
                replay_args = [tf.identity(a) for a in args]
            with tf.GradientTape() as tape:
                tape.watch(replay_args)
                replay = fn(*replay_args)
            targets = replay_args + variables
            grads = tape.gradient(
                replay, targets, output_gradients=list(upstream), unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            return grads[: len(args)], grads[len(args) :]

        return result, grad_fn

    return wrapped
