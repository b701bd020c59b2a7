import sys, time, json, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="x")
prompts = ["Write a short story about a dragon who learns to bake bread.", "Explain how a refrigerator works.",
           "List ten facts about the Moon.", "Describe a day in the life of a lighthouse keeper."]
n = 0; t0 = time.perf_counter()
for rep in range(int(sys.argv[2])):
    for p in prompts:
        s = c.chat.completions.create(model=c.models.list().data[0].id if False else "gsd-smollm2-135m", messages=[{"role": "user", "content": p}],
                                      max_tokens=128, temperature=0, stream=True)
        for ch in s:
            n += 1
dt = time.perf_counter() - t0
print(f"{n} chunks in {dt:.2f}s: {n/dt:.1f} chunks/s")
