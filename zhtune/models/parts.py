"""Where the parts of a loaded model are, under the wrappers training and inference put around it."""


def base_model(model):
    """The transformers *ForCausalLM under DDP / DeepSpeed / torch.compile / PEFT wrappers."""
    seen = 0
    while hasattr(model, "module") and seen < 5:  # DDP, DeepSpeed engine
        model, seen = model.module, seen + 1
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def decoder_layers(model):
    """The model's decoder layers (a ModuleList), or None for a model that keeps them elsewhere."""
    import torch
    try:
        layers = getattr(base_model(model).get_decoder(), "layers", None)
    except (AttributeError, NotImplementedError):
        return None
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def layer_blocks(model, name: str):
    """Each decoder layer's `name` submodule (`mlp`, `self_attn`), where the layer has one."""
    for layer in decoder_layers(model) or []:
        block = getattr(layer, name, None)
        if block is not None:
            yield block


class SharedSplit:
    """One computation over an input, shared by a group of sibling modules that read the same input
    (q/k/v, gate/up): `compute(x, *args)` returns one slice per member (or None: the caller runs its own
    path). The first member to run computes it, each takes its slice once, and the references are
    dropped when all have taken theirs. A member called with another input, or a second time,
    computes it again, so any call order gives the same result; only the saving needs the usual order."""

    def __init__(self, members: int, compute):
        self.members, self.compute = members, compute
        self.x = self.parts = None  # the input `parts` were computed for
        self.pending = 0  # bit i: member i has not taken its slice yet

    def take(self, index: int, x, *args):
        if self.x is not x or not (self.pending >> index) & 1:
            parts = self.compute(x, *args)
            if parts is None:
                self.x = self.parts = None
                return None
            self.x, self.parts, self.pending = x, parts, (1 << self.members) - 1
        part = self.parts[index]
        self.pending &= ~(1 << index)
        if not self.pending:
            self.x = self.parts = None
        return part
