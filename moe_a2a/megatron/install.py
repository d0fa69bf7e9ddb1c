"""``install()``: run megatron-core's MoE dispatch on moe_a2a without a Megatron fork.

After ``install()``:

* ``moe_token_dispatcher_type="flex"`` with ``moe_flex_dispatcher_backend="deepep"`` or ``"hybridep"``
  runs on ``moe_a2a.fused_a2a``: the names megatron's flex dispatcher calls (``fused_dispatch``,
  ``fused_combine``, ``hybrid_ep_dispatch``, ``hybrid_ep_combine``, ``set_deepep_num_sms``, ...) are
  rebound to ours in ``megatron.core.transformer.moe.fused_a2a`` and in every megatron module that
  imported them by name, so no ``deep_ep`` package is needed.
  With ``buffer_resident`` (default), the deepep backend's ``fused_dispatch`` receives the rows in the
  communication buffer and megatron's permute (``_DeepepManager.get_permuted_hidden_states_by_experts``)
  reads them from there, through ``moe_a2a.resident.claim`` (a copy if another operation on the buffer
  came first); the unpermute (``get_restored_hidden_states_by_experts``, megatron's unfused one) sums each
  token's expert rows in float32 straight into the buffer's combine input, and the combine reads them there
  (its backward leaves the gradient in the buffer for the unpermute's backward). With
  ``moe_permute_fusion`` (Transformer Engine's kernels) the unpermute and combine stay megatron's.
  megatron-core 0.19's extra HybridEP keywords (kernel block counts, ``fused``) are accepted and
  ignored: moe_a2a permutes inside its own dispatch.
* ``moe_token_dispatcher_type="moe_a2a"`` builds ``MoEA2ATokenDispatcher`` in ``MoELayer``; the value
  is added to ``TransformerConfig``'s ``Literal`` annotation and, when Megatron-LM's
  ``megatron.training.arguments`` is importable, to the choices of ``--moe-token-dispatcher-type``
  of parsers built afterwards.

``install()`` is idempotent; ``uninstall()`` restores everything it changed.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import typing
from typing import Dict, List

DISPATCHER_TYPE = "moe_a2a"
# megatron.core.transformer.moe.fused_a2a names that moe_a2a.fused_a2a provides with the same API.
FUSED_A2A_NAMES = ("fused_dispatch", "fused_combine", "set_deepep_num_sms", "get_buffer", "get_hidden_bytes",
                   "FusedDispatch", "FusedCombine", "hybrid_ep_dispatch", "hybrid_ep_combine",
                   "HybridEPDispatch", "HybridEPCombine", "init_hybrid_ep_buffer", "reset_hybrid_ep_buffer")
# Modules known to bind fused_a2a names at import time (others are found by identity, below).
_BINDING_MODULES = ("megatron.core.transformer.moe.fused_a2a", "megatron.core.transformer.moe.token_dispatcher")

_lock = threading.Lock()
_undo: List[tuple] = []
_building = threading.local()
_MISSING = object()
_summary: Dict[str, object] = {}


def _set(obj, name: str, value) -> None:
    _undo.append((obj, name, getattr(obj, name, _MISSING)))
    setattr(obj, name, value)


def is_installed() -> bool:
    """Whether ``install()`` is in effect."""
    return bool(_undo)


def install(buffer_resident: bool = True) -> Dict[str, object]:
    """Route megatron-core's flex dispatcher to moe_a2a and register ``moe_token_dispatcher_type="moe_a2a"``.

    ``buffer_resident``: flex+deepep permutes the dispatched rows straight from the buffer (see above);
    False keeps the plain calls. The ``moe_a2a`` dispatcher reads ``config.moe_a2a_buffer_resident``.

    Returns a summary: ``{"megatron_core": version, "rebound": [module.name, ...], "argparse": bool,
    "buffer_resident": bool}`` (whether flex+deepep runs buffer-resident).

    Raises:
        ImportError: megatron-core is not installed.
    """
    with _lock:
        if _undo:
            return dict(_summary)
        try:
            import megatron.core  # noqa: F401
            from megatron.core.transformer.moe import fused_a2a as mfused
        except ImportError as exc:
            raise ImportError("moe_a2a.megatron.install() needs megatron-core (pip install megatron-core)") from exc
        from .. import fused_a2a as ours

        resident_flex = bool(buffer_resident) and _patch_deepep_permute()
        if resident_flex:
            _patch_deepep_unpermute(ours)
        rebound = _rebind_fused_a2a(mfused, ours, resident_flex)
        _patch_moe_layer()
        _patch_transformer_config()
        argparse_patched = _patch_megatron_lm_arguments()
        import megatron.core.package_info as info

        _summary.clear()
        _summary.update({"megatron_core": getattr(info, "__version__", "unknown"), "rebound": rebound,
                         "argparse": argparse_patched, "buffer_resident": resident_flex})
        return dict(_summary)



def uninstall() -> None:
    """Undo ``install()``: restore every attribute it replaced."""
    with _lock:
        while _undo:
            obj, name, old = _undo.pop()
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        _summary.clear()


def _megatron_version() -> tuple:
    import megatron.core.package_info as info

    parts = []
    for piece in str(getattr(info, "__version__", "0")).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _hybrid_ep_adapters(ours) -> Dict[str, object]:
    """megatron-core 0.19 calls the HybridEP functions with more keywords (block counts of its
    permute kernels, ``fused``, ``num_sms_preprocessing_api``, SM counts that may be None). moe_a2a
    permutes inside its own dispatch, so those tuning knobs do not apply; None SM counts take 24."""

    def hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=None,
                           num_sms_combine_api=None, num_blocks_permute=None, num_blocks_unpermute=None,
                           fused=False, num_permuted_tokens=None, pad_multiple=None,
                           num_sms_preprocessing_api=None):
        return ours.hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts,
                                       num_sms_dispatch_api if num_sms_dispatch_api is not None else 24,
                                       num_sms_combine_api if num_sms_combine_api is not None else 24,
                                       num_permuted_tokens=num_permuted_tokens, pad_multiple=pad_multiple)

    def hybrid_ep_combine(x, handle, num_permuted_tokens, pad_multiple, fused=False):
        return ours.hybrid_ep_combine(x, handle, num_permuted_tokens, pad_multiple)

    hybrid_ep_dispatch.__doc__ = ours.hybrid_ep_dispatch.__doc__
    hybrid_ep_combine.__doc__ = ours.hybrid_ep_combine.__doc__
    return {"hybrid_ep_dispatch": hybrid_ep_dispatch, "hybrid_ep_combine": hybrid_ep_combine}


def _patch_deepep_permute() -> bool:
    """Make megatron's deepep manager read the dispatched rows through ``resident.claim``; False where this
    megatron-core has no such manager (then the dispatch stays plain)."""
    from megatron.core.transformer.moe import token_dispatcher

    from .. import resident

    manager = getattr(token_dispatcher, "_DeepepManager", None)
    original = getattr(manager, "get_permuted_hidden_states_by_experts", None)
    if original is None:
        return False

    def get_permuted_hidden_states_by_experts(self, hidden_states, *args, **kwargs):
        return original(self, resident.claim(hidden_states), *args, **kwargs)

    get_permuted_hidden_states_by_experts.__wrapped__ = original
    _set(manager, "get_permuted_hidden_states_by_experts", get_permuted_hidden_states_by_experts)
    return True


def _patch_deepep_unpermute(ours) -> bool:
    """Make megatron's deepep manager sum the expert outputs into the buffer's combine input (unfused
    unpermute only) and combine them from there; False where this megatron-core has no such manager."""
    from megatron.core.transformer.moe import token_dispatcher

    from .. import resident
    from ..permute import SumRows

    manager = getattr(token_dispatcher, "_DeepepManager", None)
    unpermute = getattr(manager, "get_restored_hidden_states_by_experts", None)
    combine = getattr(manager, "combine", None)
    if unpermute is None or combine is None:
        return False

    def get_restored_hidden_states_by_experts(self, hidden_states, *args, **kwargs):
        if getattr(self, "permute_fusion", False) or args or kwargs or self.handle is None:
            return unpermute(self, hidden_states, *args, **kwargs)
        # Megatron's unpermute without probs: token sorted_indices[p] gets row p (a sum per token).
        summed = SumRows.apply(hidden_states, self.reversed_mapping_for_combine,
                               self.hidden_shape_before_permute[0], (self.group, self.handle, 0))
        resident.hold(ours.get_buffer(self.group, ours.get_hidden_bytes(hidden_states)), summed)
        self._moe_a2a_summed = summed
        return summed

    def combine_resident(self, hidden_states, async_finish=False, allocate_on_comm_stream=False):
        summed, self._moe_a2a_summed = getattr(self, "_moe_a2a_summed", None), None
        if summed is None or hidden_states is not summed:  # not our unpermute's output: megatron's own path
            return combine(self, hidden_states, async_finish, allocate_on_comm_stream)
        out, _ = ours.fused_combine_resident(resident.claim(hidden_states), self.group, self.handle, async_finish,
                                             allocate_on_comm_stream)
        self.handle = None  # as megatron's combine: released after the combine
        return out

    get_restored_hidden_states_by_experts.__wrapped__ = unpermute
    combine_resident.__wrapped__ = combine
    _set(manager, "get_restored_hidden_states_by_experts", get_restored_hidden_states_by_experts)
    _set(manager, "combine", combine_resident)
    return True


def _resident_fused_dispatch(ours):
    """``fused_dispatch`` receiving in the buffer, for a manager whose permute claims the rows."""

    def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                       allocate_on_comm_stream=False):
        # Room for the most rows a rank can receive (megatron gives every rank the same token count).
        ours.reserve_receive_rows(group, x.size(0) * group.size())
        return ours.fused_dispatch_resident(x, token_indices, token_probs, num_experts, group, async_finish,
                                            allocate_on_comm_stream)

    fused_dispatch.__doc__ = ours.fused_dispatch_resident.__doc__
    return fused_dispatch


def _rebind_fused_a2a(mfused, ours, buffer_resident: bool = False) -> List[str]:
    replacements = {name: getattr(ours, name) for name in FUSED_A2A_NAMES}
    if buffer_resident:
        replacements["fused_dispatch"] = _resident_fused_dispatch(ours)
    if _megatron_version() >= (0, 19):
        replacements.update(_hybrid_ep_adapters(ours))
    originals = {name: getattr(mfused, name, None) for name in FUSED_A2A_NAMES}
    rebound = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith("megatron."):
            continue
        known = mod_name in _BINDING_MODULES
        for name in FUSED_A2A_NAMES:
            if not hasattr(module, name):
                continue
            current = getattr(module, name)
            # Without deep_ep megatron binds these names to None, so identity says nothing there:
            # rebind None only in the modules known to import them.
            if current is originals[name] and (current is not None or known):
                _set(module, name, replacements[name])
                rebound.append(f"{mod_name}.{name}")
    for flag in ("HAVE_DEEP_EP", "HAVE_HYBRIDEP"):
        if hasattr(mfused, flag):
            _set(mfused, flag, True)
    return rebound


def _patch_moe_layer() -> None:
    """Let ``MoELayer`` build ``MoEA2ATokenDispatcher`` for ``moe_token_dispatcher_type="moe_a2a"``.

    megatron-core picks the dispatcher in ``MoELayer.__init__`` with an if/elif on the type and raises
    for unknown values. The wrapper presents the type as ``"flex"`` for the duration of the original
    ``__init__`` and swaps the flex class it instantiates for ours; the config's value is restored
    before ``__init__`` returns.
    """
    from megatron.core.transformer.moe import moe_layer

    from .dispatcher import MoEA2ATokenDispatcher

    flex_cls = getattr(moe_layer, "MoEFlexTokenDispatcher", None)
    original_init = moe_layer.MoELayer.__init__

    def make_flex(*args, **kwargs):
        cls = MoEA2ATokenDispatcher if getattr(_building, "active", False) else flex_cls
        return cls(*args, **kwargs)

    def __init__(self, config, *args, **kwargs):
        if getattr(config, "moe_token_dispatcher_type", None) != DISPATCHER_TYPE:
            return original_init(self, config, *args, **kwargs)
        if flex_cls is None:
            raise NotImplementedError("this megatron-core has no MoEFlexTokenDispatcher in moe_layer; "
                                      "moe_token_dispatcher_type='moe_a2a' cannot be wired in")
        _building.active = True
        config.moe_token_dispatcher_type = "flex"
        try:
            original_init(self, config, *args, **kwargs)
        finally:
            config.moe_token_dispatcher_type = DISPATCHER_TYPE
            _building.active = False

    __init__.__wrapped__ = original_init
    __init__.__doc__ = original_init.__doc__
    _set(moe_layer, "MoEFlexTokenDispatcher", make_flex)
    _set(moe_layer.MoELayer, "__init__", __init__)


def _with_choice(annotation):
    """``Literal[...]`` (object or string form) with ``"moe_a2a"`` added."""
    if isinstance(annotation, str):
        if DISPATCHER_TYPE in annotation or not annotation.rstrip().endswith("]"):
            return annotation
        return annotation.rstrip()[:-1] + f", '{DISPATCHER_TYPE}']"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal and DISPATCHER_TYPE not in args:
        return typing.Literal[args + (DISPATCHER_TYPE,)]
    return annotation


def _patch_transformer_config() -> None:
    """Add ``"moe_a2a"`` to the ``Literal`` of ``TransformerConfig.moe_token_dispatcher_type``.

    The dataclass does not check the value at run time, but argument parsers generated from its
    fields (newer Megatron-LM) take their choices from this annotation.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    field = TransformerConfig.__dataclass_fields__.get("moe_token_dispatcher_type")
    if field is None:
        return
    new = _with_choice(field.type)
    if new is not field.type:
        _set(field, "type", new)
        annotations = dict(TransformerConfig.__annotations__)
        annotations["moe_token_dispatcher_type"] = new
        _set(TransformerConfig, "__annotations__", annotations)


def _patch_megatron_lm_arguments() -> bool:
    """Add ``moe_a2a`` to ``--moe-token-dispatcher-type`` of Megatron-LM's parser, when it is importable.

    Megatron-LM (not megatron-core) adds the argument in ``megatron.training.arguments._add_moe_args``;
    the wrapper appends the choice to the action that function created.
    """
    try:
        spec = importlib.util.find_spec("megatron.training.arguments")
    except (ImportError, ValueError):
        spec = None
    if spec is None and "megatron.training.arguments" not in sys.modules:
        return False
    arguments = importlib.import_module("megatron.training.arguments")
    original = getattr(arguments, "_add_moe_args", None)
    if original is None:
        return False

    def _add_moe_args(parser, *args, **kwargs):
        result = original(parser, *args, **kwargs)
        add_dispatcher_choice(parser)
        return result

    _add_moe_args.__wrapped__ = original
    _set(arguments, "_add_moe_args", _add_moe_args)
    return True


def add_dispatcher_choice(parser) -> bool:
    """Append ``moe_a2a`` to the choices of ``--moe-token-dispatcher-type`` in an argparse parser.

    Returns whether the option was found.
    """
    action = parser._option_string_actions.get("--moe-token-dispatcher-type")
    if action is None:
        return False
    if action.choices is not None and DISPATCHER_TYPE not in action.choices:
        action.choices = list(action.choices) + [DISPATCHER_TYPE]
    return True
