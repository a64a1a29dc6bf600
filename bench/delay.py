"""A TCP proxy that delays every byte by a fixed time each way: a long link on loopback.

This VM's kernel has no netem (``tc qdisc ... netem`` answers "Specified qdisc kind is
unknown"), so a wide-area link is emulated here instead: each chunk read from one side is
written to the other ``delay`` seconds later, both ways, so a round trip through the proxy takes
twice the delay more than without it.  Latency only: no bandwidth cap, no loss, no reordering.
The proxy holds at most ``BUFFERED`` bytes in flight each way (it stops reading past that), as a
link holds at most its bandwidth-delay product.

    .venv/bin/python -m bench.delay --delay-ms 25 127.0.0.1:7101 127.0.0.1:7102=7202

prints one line per target, ``HOST:PORT -> 127.0.0.1:LISTEN``, once it listens (on the port
given after ``=``, else any free one), then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

#: Bytes one direction of one connection holds in flight at most (a 1 Gbit/s link of 250 ms
#: round trip holds ~31 MB).
BUFFERED = 32 * 1024 * 1024
CHUNK = 256 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    room = asyncio.Semaphore(BUFFERED // CHUNK)

    async def feed() -> None:
        while True:
            await room.acquire()
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                return

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            room.release()

    try:
        await asyncio.gather(feed(), deliver())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(targets: list[tuple[str, int, int]], delay: float) -> None:
    servers = []
    for host, port, listen in targets:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           host: str = host, port: int = port) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pump(reader, up_writer, delay), _pump(up_reader, writer, delay))

        server = await asyncio.start_server(accepted, "127.0.0.1", listen, reuse_address=True)
        servers.append(server)
        print(f"{host}:{port} -> 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay (a round trip costs twice this)")
    ap.add_argument("targets", nargs="+", metavar="HOST:PORT[=LISTEN]")
    args = ap.parse_args()
    targets = []
    for t in args.targets:
        address, _, listen = t.partition("=")
        targets.append((address.rpartition(":")[0], int(address.rpartition(":")[2]), int(listen or 0)))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(targets, args.delay_ms / 1000))
    sys.exit(0)


if __name__ == "__main__":
    main()
