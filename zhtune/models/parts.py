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
