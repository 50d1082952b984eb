"""
Settings for train.py, sample.py and bench.py, nanoGPT style: each script keeps its settings as
module-level globals and calls

    configure(globals(), sys.argv[1:])

Every argument is either a Python config file (its assignments override the globals) or
--key=value. An unknown key or a value of the wrong type is an error that names the key.
"""
import ast


def _coerce(key, value, default):
    if default is None or type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    if type(default) is tuple and type(value) in (int, list):  # --eval_loops=4 or a list in a file
        return tuple(value) if isinstance(value, list) else (value,)
    raise ValueError(f"config key {key!r} expects {type(default).__name__} (default {default!r}), "
                     f"got {type(value).__name__} {value!r}")


def _parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --device=cuda


def configure(settings, argv):
    """Override the keys of settings (a script's globals) from config files and --key=value args."""
    def assign(key, value, where):
        if key not in settings or key.startswith("_"):
            raise ValueError(f"unknown config key {key!r} ({where})")
        settings[key] = _coerce(key, value, settings[key])

    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ValueError(f"expected --key=value, got {arg!r}")
            key, text = arg[2:].split("=", 1)
            assign(key, _parse(text), "command line")
        else:
            scope = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), scope)
            except FileNotFoundError:
                raise ValueError(f"config file {arg!r} not found") from None
            for key, value in scope.items():
                if not key.startswith("_") and not callable(value) and not hasattr(value, "__spec__"):
                    assign(key, value, arg)
