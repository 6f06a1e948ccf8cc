"""Model-conversion plumbing shared by the families: which linears to replace, forward hooks over
calibration batches, and swapping a module in place."""

from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm


def target_linears(model: nn.Module, skip: Iterable[str]) -> List[Tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` of ``model`` by dotted name, except the skipped ones. A ``skip`` entry matches a
    whole run of name components: "lm_head" matches "lm_head" and "model.lm_head"; "layers.0" matches
    everything under it."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip or ())  # "lm_head" is one name, not 7 letters
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(f".{s}." in f".{name}." for s in skip)]


@torch.no_grad()
def observe_inputs(model: nn.Module, targets, calib_batches: Iterable,
                   record: Callable[[str, torch.Tensor], None], desc: str, progress: bool) -> None:
    """Run ``calib_batches`` (tensors, or dicts of keyword arguments) through ``model`` with forward hooks
    calling ``record(name, x)`` with each target's input flattened to ``[rows, in_features]``. Raises
    ValueError naming the layers that saw no input."""
    seen = {name: False for name, _ in targets}

    def hook(name):
        def on_forward(module, args, output):
            seen[name] = True
            record(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return on_forward

    handles = [m.register_forward_hook(hook(name)) for name, m in targets]
    try:
        for batch in tqdm(calib_batches, desc=desc, unit="batch", disable=not progress):
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, ok in seen.items() if not ok]
    if missing:
        raise ValueError(f"calib_batches: these layers saw no input: {missing[:5]}")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def copy_bias(module: nn.Module, bias: Optional[torch.Tensor]) -> None:
    """Give ``module`` a copy of ``bias`` as its ``bias`` parameter (keeping ``requires_grad``)."""
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
