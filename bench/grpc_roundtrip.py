"""What a long-lived bidirectional stream would save over one unary call per round, on loopback.

An aio client (as the router) calls a sync thread-pool server in another process (as the draft and target
workers) with a 300-byte message, 2,000 round trips per way, three repeats: a unary call each time, or one
message each way on a stream opened once. Echo handlers, no model: only the call's own cost.

    python bench/grpc_roundtrip.py > bench/results/grpc-roundtrip-zen4/result.txt
"""
import asyncio, time, statistics, grpc, sys, multiprocessing as mp
from concurrent import futures

def serve(port):
    def u(req, ctx): return req
    def st(it, ctx):
        for m in it: yield m
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    h = grpc.method_handlers_generic_handler("t.T", {
        "U": grpc.unary_unary_rpc_method_handler(u),
        "S": grpc.stream_stream_rpc_method_handler(st)})
    s.add_generic_rpc_handlers((h,)); s.add_insecure_port(f"127.0.0.1:{port}"); s.start(); s.wait_for_termination()

async def main(port):
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await ch.channel_ready()
    U = ch.unary_unary("/t.T/U"); S = ch.stream_stream("/t.T/S")
    payload = b"x" * 300
    for _ in range(200): await U(payload)
    res = {}
    for rep in range(3):
        t = []
        for _ in range(2000):
            t0 = time.perf_counter(); await U(payload, timeout=10); t.append(time.perf_counter() - t0)
        res.setdefault("unary", []).append(statistics.median(t) * 1e6)
        call = S()
        t = []
        for _ in range(2000):
            t0 = time.perf_counter(); await call.write(payload); await call.read(); t.append(time.perf_counter() - t0)
        await call.done_writing()
        res.setdefault("stream", []).append(statistics.median(t) * 1e6)
    print({k: [round(x) for x in v] for k, v in res.items()}, "us median round trip (aio client, sync threadpool server in another process)")

if __name__ == "__main__":
    p = mp.Process(target=serve, args=(50932,), daemon=True); p.start()
    asyncio.run(main(50932)); p.terminate()
