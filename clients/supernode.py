"""Flower's SuperNode with its idle waits capped: ``python -m rwft.clients.supernode ARGS``.

It takes exactly ``flower-supernode``'s arguments and runs Flower's own SuperNode with
rwft's adjustment to its loop (``rwft.federation.flower_compat``: capped waits, applied only
where the installed Flower is the one it was written for, otherwise its log says it is off)
and with timestamps in its log, so that a site can see when each round's messages came and
went.
"""

from __future__ import annotations

import sys


def main() -> None:
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from rwft.federation.flower_compat import patch_supernode

    patch_supernode()
    update_console_handler(timestamps=True, colored=False)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
