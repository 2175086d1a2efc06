"""Which sites may join: the SuperLink's registered keys follow ``federation.site_keys``.

The SuperLink keeps its registrations in its state database, which outlives a restart
(``--resume``), and refuses a key registered twice. So the keys registered so far are
recorded beside that database (``superlink/site_keys.json``: name, node id, key), and
at each start the folder is the truth: a new ``.pub`` file is registered, one whose key
changed is re-registered, and one removed from the folder is unregistered, which
revokes that hospital. The folder is read and checked by ``rwft.federation.site_keys.site_public_keys``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rwft.core.checkpoint import write_json
from rwft.server.superlink import FlowerCli


def admit_sites(flwr: FlowerCli, keys: dict[str, Path], run_dir: Path) -> list[str]:
    """Make the SuperLink admit exactly the sites with a key in ``keys`` (``site_public_keys``);
    returns their names."""
    record_file = run_dir / "superlink" / "site_keys.json"
    registered: dict[str, dict[str, str | int]] = (
        json.loads(record_file.read_text()) if record_file.is_file() else {})
    wanted = {name: path.read_text().split()[1] for name, path in keys.items()}  # the base64 key itself
    for name, entry in list(registered.items()):
        if wanted.get(name) != entry["key"]:  # removed from the folder, or its key replaced
            flwr.unregister_site(int(entry["node_id"]))
            del registered[name]
            write_json(record_file, registered)
    for name, key in wanted.items():
        if name not in registered:
            node_id = flwr.register_site(keys[name], name)
            registered[name] = {"node_id": node_id, "key": key}
            write_json(record_file, registered)
    return sorted(registered)

