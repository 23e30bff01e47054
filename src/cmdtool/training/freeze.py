"""Eq. 11 on a live model: embedded weights take the value a_i r_m(t) + b_i and are not trained.

    w_i(t) <- SGD update          if i is not embedded
              a_i w_m(t) + b_i    if i is embedded                              (paper 000, Eq. 11)

"Not trained" is enforced three ways, so that neither the gradient, nor momentum, nor weight decay moves an
embedded weight:

1. a gradient hook zeroes the embedded entries of each parameter's gradient;
2. when weights are embedded, their entries of the optimizer's state (momentum buffers, Adam moments: every
   state tensor shaped like the parameter) are zeroed;
3. after every ``optimizer.step()`` (a step post-hook) the embedded entries are set to a_i r_m + b_i with the
   references' values after that step, so the embedded weights follow their references through the epoch.
   Without an optimizer, :meth:`FrozenEmbedding.apply` is called at each epoch end only.

The embedded value is computed in float32 as ``a * r + b`` (two roundings) with float32 coefficients and cast
to the parameter's dtype; :meth:`FrozenEmbedding.coefficients` returns exactly those coefficients.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import UsageError
from .layout import StateLayout


def innermost_optimizer(optimizer):
    """The torch optimizer inside wrappers (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer)."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class _ParameterPart:
    """The embedded entries of one parameter: a boolean mask of its shape and, in the mask's row-major
    order, the float32 coefficients and the position of each entry's reference in the reference vector."""

    def __init__(self, parameter: torch.nn.Parameter):
        self.parameter = parameter
        self.flat_index = np.empty(0, dtype=np.int64)
        self.mask = torch.zeros(parameter.shape, dtype=torch.bool, device=parameter.device)
        self.a = torch.empty(0, dtype=torch.float32, device=parameter.device)
        self.b = torch.empty(0, dtype=torch.float32, device=parameter.device)
        self.reference = torch.empty(0, dtype=torch.int64, device=parameter.device)
        self.hook = None

    def add(self, flat_index: np.ndarray, a: np.ndarray, b: np.ndarray, reference: np.ndarray) -> None:
        device = self.parameter.device
        index = np.concatenate([self.flat_index, flat_index])
        order = np.argsort(index, kind="stable")
        self.flat_index = index[order]
        order_t = torch.as_tensor(order, device=device)
        self.a = torch.cat([self.a, torch.as_tensor(a, dtype=torch.float32, device=device)])[order_t]
        self.b = torch.cat([self.b, torch.as_tensor(b, dtype=torch.float32, device=device)])[order_t]
        self.reference = torch.cat([self.reference, torch.as_tensor(reference, dtype=torch.int64,
                                                                    device=device)])[order_t]
        self.mask.view(-1)[torch.as_tensor(flat_index, device=device)] = True


class FrozenEmbedding:
    """Holds the embedded weights of ``model`` at a_i r_m + b_i (Eq. 11).

    ``layout`` maps rows to the model's state-dict tensors; ``reference_rows`` are the M reference weights
    (never embedded; row j is reference j). ``optimizer`` (optional, recommended) gets a step post-hook and has
    its state zeroed for embedded entries.
    """

    def __init__(self, model: torch.nn.Module, layout: StateLayout, reference_rows: np.ndarray, optimizer=None):
        self.layout = layout
        self.tensors = model.state_dict(keep_vars=True)
        self.parameters = {name: t for name, t in self.tensors.items() if isinstance(t, torch.nn.Parameter)}
        self.reference_rows = np.asarray(reference_rows, dtype=np.int64)
        which, flat = layout.locate(self.reference_rows)
        # references grouped by tensor: (tensor, flat indices in it, positions in the reference vector)
        self._reference_sources = []
        for entry_pos in np.unique(which):
            positions = np.flatnonzero(which == entry_pos)
            tensor = self.tensors[layout.entries[entry_pos].name]
            self._reference_sources.append((tensor, torch.as_tensor(flat[positions], device=tensor.device),
                                            torch.as_tensor(positions)))
        self.parts: dict[str, _ParameterPart] = {}
        self.optimizer = None
        self._step_hook = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ set-up
    def attach_optimizer(self, optimizer) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
        self.optimizer = innermost_optimizer(optimizer)
        self._step_hook = self.optimizer.register_step_post_hook(lambda *_: self.apply())
        self._zero_optimizer_state()

    def remove_hooks(self) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        for part in self.parts.values():
            if part.hook is not None:
                part.hook.remove()
                part.hook = None

    # ------------------------------------------------------------------ embedding
    def embed(self, rows: np.ndarray, a: np.ndarray, b: np.ndarray, reference: np.ndarray) -> None:
        """Embed ``rows`` (all trainable parameter entries) with their coefficients and reference positions."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        which, flat = self.layout.locate(rows)
        for entry_pos in np.unique(which):
            name = self.layout.entries[entry_pos].name
            if name not in self.parameters:
                raise UsageError(f"{name} is not a parameter of the model: only parameters can be embedded")
            pick = which == entry_pos
            part = self.parts.get(name)
            if part is None:
                part = self.parts[name] = _ParameterPart(self.parameters[name])
                part.hook = part.parameter.register_hook(functools.partial(_zero_embedded_gradient, part))
            part.add(flat[pick], a[pick], b[pick], reference[pick])
        self._zero_optimizer_state()
        self.apply()

    def _zero_optimizer_state(self) -> None:
        if self.optimizer is None:
            return
        with torch.no_grad():
            for part in self.parts.values():
                for value in self.optimizer.state.get(part.parameter, {}).values():
                    if torch.is_tensor(value) and value.shape == part.parameter.shape:
                        value.masked_fill_(part.mask.to(value.device), 0)

    # ------------------------------------------------------------------ Eq. 11
    def reference_values(self) -> torch.Tensor:
        """The references' current values r_m (float32, CPU)."""
        values = torch.empty(len(self.reference_rows), dtype=torch.float32)
        for tensor, flat, positions in self._reference_sources:
            values[positions] = tensor.detach().reshape(-1)[flat].to("cpu", torch.float32)
        return values

    @torch.no_grad()
    def apply(self) -> None:
        """Set every embedded weight to a_i r_m + b_i with the references' current values."""
        if not self.parts:
            return
        references = self.reference_values()
        on_device = {}
        for part in self.parts.values():
            device = part.parameter.device
            if device not in on_device:
                on_device[device] = references.to(device)
            value = part.a * on_device[device][part.reference] + part.b
            part.parameter.data[part.mask] = value.to(part.parameter.dtype)

    def coefficients(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(flat indices, a, b, reference position) of the embedded entries of parameter ``name`` (float32)."""
        part = self.parts[name]
        return part.flat_index.copy(), part.a.cpu().numpy(), part.b.cpu().numpy(), part.reference.cpu().numpy()


def _zero_embedded_gradient(part: _ParameterPart, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(part.mask.to(grad.device), 0)
