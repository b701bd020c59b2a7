"""Tools that drive gsd-serve from outside: the in-process benchmark (bench), the settings search (tune),
running a Serve config (serve), the serving benchmark (bench_serve) and its llama.cpp anchor (llama_server),
a whole stack on this machine and a look into it (local_stack), and the chaos and soak runs (reliability).

They start subprocesses, redis-server and Ray clusters, and plot: their extra dependencies (matplotlib,
aiohttp, httpx) come with `pip install gsd-serve[bench]`.

May import gsd_serve.core, gsd_serve.models and gsd_serve.serving (gsd_serve.services included). Never
imports gsd_serve.training or gsd_serve.cli (the commands in cli/ parse their arguments and call in here).
"""
