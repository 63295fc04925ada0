"""Per-example gradients, shared by the probe families that need them (influence, gradient coherence).

``tracking``: which weight matrices are tracked and how one backward pass gives every example's gradient of
each of them (from the layer's inputs and the gradient at its outputs, never one backward pass per example);
``moe``: mixture-of-experts experts and routers as tracked modules, and the default set of a language model;
``tasks``: how a loss is called on a batch (summed over examples, so an example's gradient does not depend on
its batch) and labels sampled from the model.
"""
