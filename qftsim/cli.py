"""The `qftsim` command line.

Exit codes: 0 success; 1 a check failed (an invalid profile, a parity
mismatch); 2 a usage or input error (bad file, unknown profile, bad shape),
reported as one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from qftsim.errors import QftsimError
from qftsim.profile import list_profiles, load_profile

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USER_ERROR = 0, 1, 2


def _profiles_list(args) -> int:
    for name in list_profiles():
        p = load_profile(name)
        w, a, acc = p.weights, p.activations, p.accumulator
        print(f"{name:24s} W{w.bits} A{a.bits} acc{acc.bits} {acc.overflow:8s} "
              f"{p.requant.scheme}/{p.requant.rounding}")
    return EXIT_OK


def _profiles_show(args) -> int:
    p = load_profile(args.profile)
    print(f"# hash {p.hash}")
    print(yaml.safe_dump(p.to_dict(), sort_keys=False), end="")
    return EXIT_OK


def _profiles_validate(args) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            p = load_profile(path)
            print(f"ok       {path} ({p.name})")
        except QftsimError as exc:
            print(f"invalid  {exc}", file=sys.stderr)
            status = EXIT_CHECK_FAILED
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qftsim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    profiles = sub.add_parser("profiles", help="list, show and validate hardware profiles")
    psub = profiles.add_subparsers(dest="profiles_command", required=True)
    psub.add_parser("list", help="the shipped profiles").set_defaults(func=_profiles_list)
    show = psub.add_parser("show", help="a profile with every field resolved")
    show.add_argument("profile", help="a shipped profile name or a .yaml file")
    show.set_defaults(func=_profiles_show)
    validate = psub.add_parser("validate", help="check profile files; exit 1 if any is invalid")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=_profiles_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QftsimError as exc:
        print(f"qftsim: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
