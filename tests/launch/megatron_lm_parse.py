"""Parse command lines with a Megatron-LM checkout's own argument parser (plus our hook's
--spectra-* flags). Run as a script in a fresh process, since it imports that checkout's
`megatron` package:  python megatron_lm_parse.py CHECKOUT < commands.json  (a JSON list of
argument lists); prints "ok" or the first failure. Not part of the package: a test aid."""

import argparse
import json
import sys
import types
import warnings


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    import typing  # core_r0.18+ use typing.override (Python 3.12); a no-op stands in on 3.11

    typing.override = getattr(typing, "override", lambda f: f)
    # batch_invariant_kernels imports triton at module level; nothing here runs kernels.
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name)) if name.startswith("__") else (lambda *a, **k: None)
    sys.modules[stub.__name__] = stub
    warnings.simplefilter("ignore")
    from megatron.training import arguments

    import megatron_spectra.megatron_lm.hook  # noqa: F401  (patches add_megatron_arguments)

    parser = arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False))
    for argv in json.load(sys.stdin):
        try:
            args, unknown = parser.parse_known_args(argv)
        except (argparse.ArgumentError, SystemExit) as e:
            print(f"error: {e} in {argv}")
            return
        if unknown:
            print(f"unknown flags {unknown}")
            return
    print("ok")


if __name__ == "__main__":
    main()
