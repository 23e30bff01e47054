"""Eq. 11 on a live model: embedded weights take the value a_i r_m(t) + b_i.

    w_i(t) <- SGD update          if i is not embedded
              a_i w_m(t) + b_i    if i is embedded                              (paper 000, Eq. 11)

When the tie is enforced is ``tie``:

- ``"epoch"`` (Alg. 4 as written, and the authors' ``train_cmd.py``): every weight trains with the user's
  optimizer during the epoch; :meth:`FrozenEmbedding.apply`, called at each epoch's end, sets the embedded weights
  to a_i r_m + b_i with the references' values at that moment. Alg. 4's loop runs this tie before its embedding
  decision, so :meth:`FrozenEmbedding.embed` with ``tie_now=False`` leaves newly chosen weights as trained until
  the next :meth:`~FrozenEmbedding.apply`.
- ``"step"``: tied at every optimizer step, so embedded weights are not trained (what saves their updates, and in
  federated learning their communication). Their gradient entries are zeroed before each step, their optimizer
  state (momentum buffers, Adam moments: every state tensor shaped like the parameter) when they are embedded, and
  after each step (a step post-hook) they are set to a_i r_m + b_i with the references' new values.

What a reference steps on is ``reference_gradient``. At each tie, every embedded weight of mode m becomes a function
of r_m, and so does the loss; by the chain rule its derivative with respect to r_m is
∂L/∂r_m + Σ_{i∈E_m} a_i ∂L/∂w_i (E_m: the embedded weights of mode m). Moving r_m moves all of E_m by a_i times
as much, so the step in weight space grows with the mode's size 1 + Σ a_i² (53-972 on the digits CNN once
everything but the references is embedded). ``"mode"`` (this class's default, and EmbeddedCMD's with
``tie="step"``) gives each reference, before every step (a step pre-hook),

    g_m = (∂L/∂r_m + Σ_{i∈E_m} a_i ∂L/∂w_i) / (1 + Σ_{i∈E_m} a_i²),

which for plain SGD makes the tied weights' step (direction u = (1, a_i ...)) the orthogonal projection of the
untied SGD step onto u: Δw = −η u (uᵀg) / (uᵀu). ``"own"`` leaves each reference its own partial derivative
∂L/∂r_m, as plain SGD (Alg. 4's "regular SGD step") has it. With ``tie="epoch"`` the embedded entries keep their
own gradients inside the epoch either way. Weight decay acts on each reference's own value only.

``"projection"`` (``tie="epoch"`` only, EmbeddedCMD's default there; no hook) lets every weight, references
included, step on its own gradient during the epoch, as Alg. 4's "regular SGD step", and makes the tie at the
epoch's end the least-squares point of the mode's line, r_m* = (w_m + Σ_{i∈E_m} a_i (w_i − b_i)) / (1 + Σ_{i∈E_m} a_i²)
(:meth:`FrozenEmbedding.project_references`), before Eq. 11 sets w_i = a_i r_m* + b_i. The projection is
linear, so from a tied state the epoch moves r_m* by the projection of the weights' summed updates: with plain
SGD, −η Σ_k g_m,k with g_m as above at the weights as trained; with momentum, momentum SGD on g_m (the projected
part of the buffers carries the mode's velocity). The optimizer's state is left alone: the buffers' part off the
mode's line moves the weights off it inside the next epoch and is projected away at its end. Weights chosen at
the last decision enter their first tie as trained, so that tie also moves r_m by their a-weighted residuals
from the line, Σ a_i (w_i − a_i r_m − b_i) / (1 + Σ a_i²). Weight decay acts
like the chain rule of the penalty on all the mode's weights; an adaptive optimizer (Adam) scales each weight's
step by its own moments, so its projected step is not Adam on g_m.

The embedded value is computed in float32 as ``a * r + b`` (two roundings) with float32 coefficients and cast
to the parameter's dtype; :meth:`FrozenEmbedding.coefficients` returns exactly those coefficients.
"""

from __future__ import annotations

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


TIES = ("epoch", "step")
REFERENCE_GRADIENTS = ("mode", "own", "projection")


class FrozenEmbedding:
    """Holds the embedded weights of ``model`` at a_i r_m + b_i (Eq. 11).

    ``layout`` maps rows to the model's state-dict tensors; ``reference_rows`` are the M reference weights
    (never embedded; row j is reference j). ``tie`` is ``"epoch"`` (the owner calls :meth:`apply` at epoch
    ends) or ``"step"`` (tied after every step of ``optimizer``). ``reference_gradient`` is ``"mode"`` (each
    reference steps on its mode's scaled chain-rule gradient), ``"own"`` (its own partial derivative, as in
    plain SGD) or ``"projection"`` (its own partial derivative, then the least-squares tie at the epoch's end;
    ``tie="epoch"`` only). Hooks go into ``optimizer`` unless ``tie="epoch"`` with ``"own"`` or
    ``"projection"``, which need none.
    """

    def __init__(self, model: torch.nn.Module, layout: StateLayout, reference_rows: np.ndarray, optimizer=None,
                 tie: str = "epoch", reference_gradient: str = "mode"):
        if tie not in TIES:
            raise UsageError(f"tie must be one of {', '.join(TIES)} (got {tie!r})")
        if reference_gradient not in REFERENCE_GRADIENTS:
            raise UsageError(f"reference_gradient must be one of {', '.join(REFERENCE_GRADIENTS)} "
                             f"(got {reference_gradient!r})")
        if reference_gradient == "projection" and tie != "epoch":
            raise UsageError("reference_gradient='projection' ties at the epoch's end: it needs tie='epoch'")
        self.tie = tie
        self.reference_gradient = reference_gradient
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
        # 1 + Σ a_i² over the embedded weights of each mode (float64): the step scale of reference_gradient="mode"
        self.mode_norm = np.ones(len(self.reference_rows), dtype=np.float64)
        self.parts: dict[str, _ParameterPart] = {}
        self.optimizer = None
        self._hooks = []
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ set-up
    @property
    def needs_optimizer(self) -> bool:
        return self.tie == "step" or self.reference_gradient == "mode"

    def attach_optimizer(self, optimizer) -> None:
        """Hook the references' gradient rule (before each step) and, with ``tie="step"``, the reset (after each
        step) into ``optimizer``."""
        if not self.needs_optimizer:
            return
        self.remove_hooks()
        self.optimizer = innermost_optimizer(optimizer)
        per_step = self.tie == "step"
        if self.reference_gradient == "mode":
            self._hooks.append(self.optimizer.register_step_pre_hook(
                lambda *_: self.tie_gradients(zero_embedded=per_step)))
        else:
            self._hooks.append(self.optimizer.register_step_pre_hook(lambda *_: self.zero_embedded_gradients()))
        if per_step:
            self._hooks.append(self.optimizer.register_step_post_hook(lambda *_: self.apply()))
            self._zero_optimizer_state()

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ------------------------------------------------------------------ embedding
    def embed(self, rows: np.ndarray, a: np.ndarray, b: np.ndarray, reference: np.ndarray,
              tie_now: bool = True) -> None:
        """Embed ``rows`` (all trainable parameter entries) with their coefficients and reference positions.

        ``tie_now`` sets them to a_i r_m + b_i at once; without it they keep their values until the next
        :meth:`apply` (Alg. 4's order: the loop's Eq. 11 line comes before its embedding decision, so weights
        chosen at epoch t are first tied at the end of epoch t + 1)."""
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
            part.add(flat[pick], a[pick], b[pick], reference[pick])
        self._update_mode_norm()
        self._zero_optimizer_state()
        if tie_now:
            self.apply()

    def _update_mode_norm(self) -> None:
        """1 + Σ a_i² per mode from the float32 coefficients as applied, summed in the layout's order (so a run
        resumed from a checkpoint gets the same bits as one that embedded step by step)."""
        norm = np.ones(len(self.reference_rows), dtype=np.float64)
        for entry in self.layout.entries:
            part = self.parts.get(entry.name)
            if part is not None:
                np.add.at(norm, part.reference.cpu().numpy(), part.a.cpu().double().numpy() ** 2)
        self.mode_norm = norm

    def _zero_optimizer_state(self) -> None:
        if self.optimizer is None or self.tie != "step":
            return
        with torch.no_grad():
            for part in self.parts.values():
                for value in self.optimizer.state.get(part.parameter, {}).values():
                    if torch.is_tensor(value) and value.shape == part.parameter.shape:
                        value.masked_fill_(part.mask.to(value.device), 0)

    # ------------------------------------------------------------------ the references' gradient
    @torch.no_grad()
    def zero_embedded_gradients(self) -> None:
        """Before a step (``tie="step"``, ``reference_gradient="own"``): 0 for the embedded entries."""
        for part in self.parts.values():
            if part.parameter.grad is not None:
                part.parameter.grad.masked_fill_(part.mask.to(part.parameter.grad.device), 0)

    @torch.no_grad()
    def tie_gradients(self, zero_embedded: bool = True) -> None:
        """Before a step: g_m = (∂L/∂r_m + Σ_{i∈E_m} a_i ∂L/∂w_i) / (1 + Σ_{i∈E_m} a_i²) for each reference,
        and (with ``zero_embedded``) 0 for the embedded entries (module docstring)."""
        if not self.parts:
            return
        pulled = torch.zeros(len(self.reference_rows), dtype=torch.float64)
        for part in self.parts.values():
            grad = part.parameter.grad
            if grad is None:
                continue
            mask = part.mask.to(grad.device)
            contribution = torch.zeros(len(pulled), dtype=torch.float64, device=grad.device)
            contribution.index_add_(0, part.reference, (part.a * grad[mask].float()).double())
            pulled += contribution.cpu()
            if zero_embedded:
                grad.masked_fill_(mask, 0)
        scale = torch.from_numpy(1.0 / self.mode_norm)
        for tensor, flat, positions in self._reference_sources:
            if tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
            grad = tensor.grad.view(-1)
            own = grad[flat].double().cpu()
            grad[flat] = ((own + pulled[positions]) * scale[positions]).to(grad.device, grad.dtype)

    # ------------------------------------------------------------------ Eq. 11
    def reference_values(self) -> torch.Tensor:
        """The references' current values r_m (float32, CPU)."""
        values = torch.empty(len(self.reference_rows), dtype=torch.float32)
        for tensor, flat, positions in self._reference_sources:
            values[positions] = tensor.detach().reshape(-1)[flat].to("cpu", torch.float32)
        return values

    @torch.no_grad()
    def project_references(self) -> None:
        """Set each reference to the least-squares point of its mode's line (Eq. 11's tie as a projection):

            r_m* = argmin_r (w_m − r)² + Σ_{i∈E_m} (w_i − a_i r − b_i)²
                 = (w_m + Σ_{i∈E_m} a_i (w_i − b_i)) / (1 + Σ_{i∈E_m} a_i²)

        with the weights as trained and the float32 coefficients as applied, summed in float64 in the layout's
        order (the same bits on every run and after a resume)."""
        if not self.parts:
            return
        pulled = torch.zeros(len(self.reference_rows), dtype=torch.float64)
        for entry in self.layout.entries:
            part = self.parts.get(entry.name)
            if part is None:
                continue
            trained = part.parameter.detach()[part.mask].double()
            contribution = torch.zeros(len(pulled), dtype=torch.float64, device=trained.device)
            contribution.index_add_(0, part.reference, part.a.double() * (trained - part.b.double()))
            pulled += contribution.cpu()
        projected = (self.reference_values().double() + pulled) / torch.from_numpy(self.mode_norm)
        for tensor, flat, positions in self._reference_sources:
            tensor.data.view(-1)[flat] = projected[positions].to(tensor.device, tensor.dtype)

    @torch.no_grad()
    def apply(self) -> None:
        """Set every embedded weight to a_i r_m + b_i with the references' current values (with
        ``reference_gradient="projection"`` the references are first moved to :meth:`project_references`)."""
        if not self.parts:
            return
        if self.reference_gradient == "projection":
            self.project_references()
        for part, value in self._tied_values():
            part.parameter.data[part.mask] = value

    def _tied_values(self):
        """(part, a_i r_m + b_i of its embedded entries in mask order, in the parameter's dtype) per parameter."""
        references = self.reference_values()
        on_device = {}
        for part in self.parts.values():
            device = part.parameter.device
            if device not in on_device:
                on_device[device] = references.to(device)
            yield part, (part.a * on_device[device][part.reference] + part.b).to(part.parameter.dtype)

    def tied_values(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter name, (mask, a_i r_m + b_i of the masked entries) with the references' current values:
        bit for bit what :meth:`apply` writes."""
        names = {id(part): name for name, part in self.parts.items()}
        return {names[id(part)]: (part.mask, value) for part, value in self._tied_values()}

    def coefficients(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(flat indices, a, b, reference position) of the embedded entries of parameter ``name`` (float32)."""
        part = self.parts[name]
        return part.flat_index.copy(), part.a.cpu().numpy(), part.b.cpu().numpy(), part.reference.cpu().numpy()
