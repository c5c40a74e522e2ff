"""`san-targetcli`: stock targetcli with san's tree at /san, beside /backstores and /iscsi.

targetcli has no plugin mechanism: this subclasses its root node (UIRoot) so that each refresh adds /san, puts the
subclass where targetcli's main() looks for its root, and runs that main() unchanged. Run it as targetcli itself
would be run (as root, same arguments: `san-targetcli ls /san`)."""

from __future__ import annotations

import os
import sys
from typing import Any


def main() -> None:
    try:
        import targetcli.targetcli_shell as targetcli_shell
        from targetcli.ui_root import UIRoot
    except ImportError as missing:
        sys.exit(f"san-targetcli: {missing}: install targetcli (Debian: apt-get install targetcli-fb)")
    from san.client import SanClient
    from san_shell.nodes import SanTree

    client = SanClient(os.environ.get("SAN_API", "http://127.0.0.1:8080"), os.environ.get("SAN_TOKEN_FILE"),
                       os.environ.get("SAN_CA_FILE"))  # fmt: skip

    class RootWithSan(UIRoot):  # type: ignore[misc]
        """targetcli's root, with /san among its children."""

        def refresh(self) -> None:
            super().refresh()
            tree = SanTree("san", self, client)
            tree.refresh()

        def execute_command(self, command: str, pparams: Any = (), kparams: Any = None) -> Any:
            return super().execute_command(command, list(pparams), kparams or {})

    targetcli_shell.UIRoot = RootWithSan
    targetcli_shell.main()


if __name__ == "__main__":
    main()
