"""`fedapp-certs`: the credentials command. `fedapp-certs DIR --host ... --nodes ...`, `proxy`
and `node-key` are fedapp.features.tls's; `sign-app` and `serve-apps` fedapp.features.appsign's. One command
for the operator and the institutions, two modules that do not import each other back."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("sign-app", "serve-apps"):
        from fedapp.features import appsign

        return appsign.main(argv)
    from fedapp.features import tls

    return tls.main(argv)


if __name__ == "__main__":
    sys.exit(main())
