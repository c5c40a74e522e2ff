"""Where a gateway finds its containers: by the label san wrote on them, never by a path the controller names. It
looks at this host's block devices and at the regular files directly under the directories it was given
(`san gateway --storage DIR`); a label found twice (a clone, a copy) is taken from neither."""

from __future__ import annotations

import os

from san.storage.containers import ContainerError, carries_label, find_labeled_devices


class Storage:
    """The places one gateway may find containers in."""

    def __init__(self, directories: list[str]) -> None:
        self.directories = directories

    def locate(self, container_id: int, container_uuid: str, store_id: str) -> str:
        """The one block device or file that carries this container's label; ContainerError if none or several."""
        if not container_uuid:
            raise ContainerError(f"container {container_id} has no label yet: a gateway cannot find it")
        found = find_labeled_devices(container_uuid, store_id) + self._files(container_uuid, store_id)
        if not found:
            where = ", ".join(self.directories) or "no --storage directory"
            raise ContainerError(f"no block device here and no file in {where} carries the label of container {container_id}")
        if len(found) > 1:
            raise ContainerError(f"{' and '.join(found)} all carry the label of container {container_id}: taking none")
        return found[0]

    def _files(self, container_uuid: str, store_id: str) -> list[str]:
        found = []
        for directory in self.directories:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and carries_label(entry.path, container_uuid, store_id, False):
                    found.append(entry.path)
        return found
