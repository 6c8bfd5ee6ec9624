"""``python -m minisq demo | quantize | reproduce`` (also the ``minisq`` console script).

Each subcommand is one program in :mod:`minisq.cli`; ``minisq SUBCOMMAND --help`` lists its options.
"""

import sys

COMMANDS = {
    "demo": ("minisq.cli.demo", "quantize a model with SmoothQuant and compare it with float and the baselines"),
    "quantize": ("minisq.cli.quantize", "SmoothQuant a checkpoint layer by layer into a folder (big models)"),
    "reproduce": ("minisq.cli.reproduce", "the paper's tables on real models, cached per model and variant"),
}


def usage() -> str:
    lines = ["usage: minisq {demo,quantize,reproduce} [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "minisq SUBCOMMAND --help shows a subcommand's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"minisq: unknown subcommand {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"minisq {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
