"""Small helpers shared by the quantizers."""
import functools
import inspect
import typing as tp


def simple_repr(obj, attrs: tp.Optional[tp.List[str]] = None, overrides: tp.Optional[dict] = None) -> str:
    """`Class(arg=value,...)` listing the constructor arguments that differ
    from their defaults (or have none), or exactly `attrs` when given."""
    overrides = overrides or {}
    signature = inspect.signature(obj.__class__).parameters
    shown = []
    for attr in (signature.keys() if attrs is None else attrs):
        if attr in overrides:
            value = overrides[attr]
        elif hasattr(obj, attr):
            value = getattr(obj, attr)
        else:
            continue
        param = signature.get(attr)
        if param is None or param.default is inspect.Parameter.empty or value != param.default:
            shown.append(f"{attr}={value}")
    return f"{obj.__class__.__name__}({','.join(shown)})"


def capture_init(init):
    """Wrap `__init__` so the arguments it was called with are kept in
    `self._init_kwargs`: quantized states store them to rebuild the
    quantizer on load."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = dict(bound.arguments)
        given.pop("self")
        given.update(bound.kwargs)
        self._init_kwargs = given
        init(self, *args, **kwargs)

    return wrapped


class QuantizerConfigError(ValueError, AssertionError):
    """A bad constructor argument or model. It is a ValueError, and also an
    AssertionError because diffq raised that for the same cases."""
