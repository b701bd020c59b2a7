"""What a long-lived bidirectional stream would save over one unary call per round, on loopback.

An aio client (as the router) calls a sync thread-pool server in another process (as the draft and target
workers) with a 300-byte message, 2,000 round trips per way, three repeats: a unary call each time, or one
message each way on a stream opened once. Echo handlers, no model: only the call's own cost.

    python bench/grpc_roundtrip.py > bench/results/DATE-CPU-grpc-roundtrip/result.txt
"""
import asyncio
import multiprocessing as mp
import statistics
import time
from concurrent import futures

import grpc

from gsd_serve.serving.serve_config import free_port

CALLS, REPEATS, PAYLOAD = 2000, 3, b"x" * 300


def serve(port: int) -> None:
    def unary(request, context):
        return request

    def stream(requests, context):
        yield from requests

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "U": grpc.unary_unary_rpc_method_handler(unary),
        "S": grpc.stream_stream_rpc_method_handler(stream)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def median_us(one_trip) -> float:
    times = []
    for _ in range(CALLS):
        t0 = time.perf_counter()
        await one_trip()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6)


async def main(port: int) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await channel.channel_ready()
    unary, stream = channel.unary_unary("/t.T/U"), channel.stream_stream("/t.T/S")
    for _ in range(200):      # warm-up
        await unary(PAYLOAD)
    result: dict[str, list[float]] = {"unary": [], "stream": []}
    for _ in range(REPEATS):
        result["unary"].append(await median_us(lambda: unary(PAYLOAD, timeout=10)))
        call = stream()

        async def message_pair():
            await call.write(PAYLOAD)
            await call.read()

        result["stream"].append(await median_us(message_pair))
        await call.done_writing()
    print(result, "us median round trip (aio client, sync threadpool server in another process)")


if __name__ == "__main__":
    port = free_port()
    server = mp.Process(target=serve, args=(port,), daemon=True)
    server.start()
    asyncio.run(main(port))
    server.terminate()
