"""`san demo`: serve a data directory with a demo pool and a 10 GiB thin vdisk that every initiator may use.

Open access is the documented demo mode (off in `san serve` unless asked for); never use it on a shared network."""

from __future__ import annotations

from san.serve import Options, serve
from san.service import Service
from san.units import format_exact

POOL = "demo"
VDISK = "demo0"


async def demo(data_dir: str, api: tuple[str, int], portal: tuple[str, int], iqn: str, size: int) -> int:
    """Run the demo target until a signal."""

    async def prepare(service: Service) -> None:
        controller = service.controller
        if POOL not in {p.name for p in controller.pools.values()}:
            await controller.create_pool(POOL, max(2 * size, 1 << 30))
        existing = next((v for v in controller.vdisks.values() if v.name == VDISK), None)
        if existing is None:
            existing = await controller.create_vdisk(VDISK, POOL, size)
        elif existing.size_bytes != size:
            print(
                f"san demo: {VDISK} already exists in {data_dir} with {format_exact(existing.size_bytes)}: --size "
                f"{format_exact(size)} applies to a new data directory (or grow it: san vdisk grow {VDISK} --size ...)"
            )
        size_shown = format_exact(existing.size_bytes)
        host, port = portal
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        url = f"iscsi://{shown}:{port}/{iqn}/0"
        print(
            f"\nsan demo: thin vdisk {VDISK} ({size_shown}) in pool {POOL}, open to every initiator, on {shown}:{port}\n"
            f"  discover and list LUNs:  iscsi-ls -s iscsi://{shown}:{port}\n"
            f"  kernel initiator:        iscsiadm -m discovery -t sendtargets -p {shown}:{port}\n"
            f"                           iscsiadm -m node -T {iqn} -p {shown}:{port} --login\n"
            f"  copy an image onto it:   qemu-img convert -n -O raw disk.img {url}\n"
            f"  read it back:            qemu-img convert -O raw {url} copy.img\n"
            f"  manage it:               san --api http://{api[0]}:{api[1]} vdisk list\n"
            "Ctrl-C stops the target (metadata is committed and files flushed first).\n",
            flush=True,
        )

    return await serve(Options(data_dir, api, portals=[portal], target_name=iqn, open_access=True), on_ready=prepare)
