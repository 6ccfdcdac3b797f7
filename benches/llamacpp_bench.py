"""Times llama.cpp (llama-cpp-python) on the exact prompt tokens `enricher bench local`
used (--dump-prompt), same GGUF file, same thread count: prompt tokens/s, generated
tokens/s (greedy), time to first token. Prints JSON."""
import argparse, json, statistics, time

from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--prompt", required=True, help="JSON from `enricher bench local --dump-prompt`")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--runs", type=int, default=5)
args = ap.parse_args()

p = json.load(open(args.prompt))
ids, gen = p["ids"], p["gen_tokens"]
llm = Llama(model_path=args.model, n_ctx=4096, n_batch=512, n_threads=args.threads,
            n_threads_batch=args.threads, seed=42, verbose=False)
eos = {llm.token_eos()}
im_end = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
if len(im_end) == 1:
    eos.add(im_end[0])

def run():
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    n = 0
    first = None
    while n < gen:
        tok = llm.sample(temp=0.0, top_k=1, repeat_penalty=1.0)
        if first is None:
            first = time.perf_counter()
        n += 1
        if tok in eos:
            break
        llm.eval([tok])
    t2 = time.perf_counter()
    return (len(ids) / (t1 - t0), n / (t2 - t1), (first - t0) * 1000.0, n)

run()  # warm-up
res = [run() for _ in range(args.runs)]
print(json.dumps({
    "prompt_tokens": len(ids),
    "prompt_tokens_per_s": statistics.median(r[0] for r in res),
    "gen_tokens_per_s": statistics.median(r[1] for r in res),
    "time_to_first_token_ms": statistics.median(r[2] for r in res),
    "gen_tokens": statistics.mean(r[3] for r in res),
    "threads": args.threads,
}))
