"""`san-targetcli`: stock targetcli with san's tree at /san, beside /backstores and /iscsi.

targetcli has no plugin mechanism: this subclasses its root node (UIRoot) so that each refresh adds /san, puts the
subclass where targetcli's main() looks for its root, and runs that main() unchanged: the module targetcli_shell of
PyPI's targetcli, or Debian's /usr/bin/targetcli script. Run it as targetcli itself would be run, as root, with the
same arguments, and with the Python targetcli runs under (Debian's: `python3 -m san_shell.targetcli ls /san`)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

DEBIAN_SCRIPT = "/usr/bin/targetcli"


def _main_of(root_class: type) -> Callable[[], None]:
    """targetcli's main(), made to build root_class as its root."""
    import targetcli

    try:
        import targetcli.targetcli_shell as shell
    except ImportError:
        script = shutil.which("targetcli") or DEBIAN_SCRIPT
        targetcli.UIRoot = root_class  # the script takes its root from the package, as it is loaded
        loader = importlib.machinery.SourceFileLoader("targetcli_script", script)
        spec = importlib.util.spec_from_loader(loader.name, loader)
        assert spec is not None
        shell = importlib.util.module_from_spec(spec)
        loader.exec_module(shell)
    shell.UIRoot = root_class
    main: Callable[[], None] = shell.main
    return main


def main() -> None:
    try:
        from targetcli.ui_root import UIRoot
    except ImportError as missing:
        sys.exit(
            f"san-targetcli: {missing}: install targetcli (Debian: apt-get install targetcli-fb, then run"
            " `python3 -m san_shell.targetcli` with the san and san_shell packages on PYTHONPATH)"
        )
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

    _main_of(RootWithSan)()


if __name__ == "__main__":
    main()
