"""Built-in ``rwft`` subcommands that live outside ``rwft.core`` (``hookspecs.register_commands``).

``rwft.core`` is the machine-learning library and imports no Flower; commands that run a
federation are registered here, like a third-party plugin would, and import their
package only when they run.
"""

from __future__ import annotations

from rwft.core.hookspecs import Register, hookimpl


def simulate(argv: list[str]) -> int:
    from rwft.server.simulation import main

    return main(argv)


@hookimpl
def register_commands(register: Register) -> None:
    register("simulate", simulate, "simulated federation of hospitals on one machine (Flower + Ray)")
