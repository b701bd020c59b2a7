"""One forward of a transformers causal LM over new tokens, with explicit positions and tree masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.kv_cache import KVCache
from .gguf_blocks import BlockLinear, GGUFDecoder, gguf_decoder
from .cpu_linear import PackedLinear, PackedWeight, pack_linears, packing_available
from .llama_forward import lean_decoder


REFINE = 8   # logits per row recomputed in fp32 when the model runs in bf16/fp16 (see ModelRunner.logits)


class ModelRunner:
    """Runs a decoder-only transformers model over a KVCache.

    `output_ids`, when given, restricts the output layer to those token ids (a reduced draft vocabulary):
    logits come back over that list and callers map positions back with `output_ids[i]`. The output
    layer is most of a small draft's cost, so this is its main cost lever.

    What it runs is read from the model (the factory chose it): its decoder forward is the C kernels' where
    the projections are GGUF or Q8_0 blocks (GGUFDecoder), else the lean Llama forward where it applies,
    else transformers' own; its output layer runs on its blocks, or oneDNN-prepacked, or as a plain linear.
    On CPU in fp32 (and bf16 where the CPU has bf16 units) the model's linear layers are swapped in place
    for oneDNN-prepacked ones (`cpu_linear`, ~1.5-2x faster for the few-row GEMMs of decoding and
    verification); `pack=False` keeps the model untouched.
    """

    def __init__(self, model: torch.nn.Module, output_ids: torch.Tensor | None = None, pack: bool = True):
        self.model = model.eval()
        self.decoder = model.base_model
        if pack:
            # the full-vocabulary head too when it is the one used (plain generate() calls benefit alike)
            pack_linears(model if output_ids is None else model.base_model)
        self._lean = gguf_decoder(model) or lean_decoder(model)
        self.weights = "gguf" if isinstance(self._lean, GGUFDecoder) else "dense"   # for reports
        self.head_weight, self.head_bias, self._head = output_layer(model, output_ids, pack)
        self.output_ids = output_ids
        self.dtype = self.head_weight.dtype
        self.vocab_size = int(model.config.vocab_size)
        self._costs: tuple[list[int], list[float]] | None = None
        self.forwards = 0
        self.tokens_fed = 0

    def new_cache(self) -> KVCache:
        return KVCache()

    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [n, V] for `tokens` [n] fed after the cache's contents.

        Without `positions` and `mask` the new tokens are causal and continue the cache. `mask` is the
        boolean [1, 1, n, cache.length + n] attention mask (True = attend).
        """
        hidden = self.hidden(cache, tokens, positions, mask)
        return self.logits(hidden[-1:] if last_only else hidden)

    @torch.inference_mode()
    def hidden(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states [n, d] of `tokens` (the forward without the output layer)."""
        start = cache.length
        n = tokens.numel()
        if positions is None:
            positions = torch.arange(start, start + n, device=tokens.device)
        if self._lean is not None:
            hidden = self._lean(cache, tokens, positions, mask)
        else:
            hidden = self.decoder(
                input_ids=tokens.view(1, -1),
                position_ids=positions.view(1, -1),
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[0]
        self.forwards += 1
        self.tokens_fed += n
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states (over `output_ids` when the vocabulary is reduced).

        In bf16/fp16 the output layer rounds each logit to 8 (11) significant bits: two logits 0.1 apart
        tie, and a one-token step and a tree forward would break such ties by chance. The best REFINE
        logits of each row are therefore recomputed with fp32 sums of the same weights, so choices among
        the top candidates are as sharp as fp32 arithmetic on these weights allows."""
        out = self._head(hidden) if self._head is not None else F.linear(hidden, self.head_weight, self.head_bias)
        out = out.float()
        if self.dtype != torch.float32 and hidden.shape[0]:
            top = out.topk(min(REFINE, out.shape[-1]), dim=-1).indices                 # [n, R]
            exact = torch.einsum("nd,nrd->nr", hidden.float(), self.head_weight[top].float())
            if self.head_bias is not None:
                exact = exact + self.head_bias[top].float()
            out.scatter_(1, top, exact)
        return out

    @property
    def fuses_many(self) -> bool:
        """Whether forward_many runs its sequences as one fused pass (else one forward after another)."""
        return self._lean is not None

    @torch.inference_mode()
    def forward_many(self, caches: list[KVCache], tokens: list[torch.Tensor], positions: list[torch.Tensor],
                     masks: list[torch.Tensor | None], features: tuple[int, ...] = (),
                     last_only: bool | list[bool] = False) -> list:
        """`forward` for several sequences at once (full logits each, or the last row's where `last_only`,
        per sequence): one fused pass where the model supports it (the lean Llama path), else one forward per
        sequence. With `features` (layer indices) each result is (logits, features) as in `forward_features`."""
        last = list(last_only) if isinstance(last_only, (list, tuple)) else [bool(last_only)] * len(caches)
        if self._lean is None:
            if features:
                raise ValueError("target features need the lean Llama forward (GSD_SERVE_LEAN_FORWARD=1)")
            return [self.forward(c, t, p, m, last_only=lo) for c, t, p, m, lo in zip(caches, tokens, positions, masks,
                                                                                      last)]
        out = self._lean.forward_many(caches, tokens, positions, masks, collect=tuple(features))
        self.forwards += 1
        self.tokens_fed += sum(t.numel() for t in tokens)
        hidden = [o[0] for o in out] if features else out
        hidden = [h[-1:] if lo else h for h, lo in zip(hidden, last)]
        logits = list(self.logits(torch.cat(hidden)).split([h.shape[0] for h in hidden]))
        return list(zip(logits, [o[1] for o in out])) if features else logits

    def forward_features(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, layers: tuple[int, ...] = (),
                         last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features): `forward`, plus the residual stream after `layers` for every new token,
        concatenated [n, len(layers) * d], for a feature draft (models/feature_draft.py)."""
        if self._lean is None:
            raise ValueError("target features need the lean Llama forward (GSD_SERVE_LEAN_FORWARD=1)")
        if positions is None:
            positions = torch.arange(cache.length, cache.length + tokens.numel(), device=tokens.device)
        (hidden, feats), = self._lean.forward_many([cache], [tokens], [positions], [mask], collect=tuple(layers))
        self.forwards += 1
        self.tokens_fed += tokens.numel()
        return self.logits(hidden[-1:] if last_only else hidden), feats

    def to_full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.output_ids is None else self.output_ids[ids]

    def forward_seconds(self, n: int) -> float:
        """The wall time of a forward of n new tokens after a short context (for sizing verification trees,
        core.graph.best_tree_size): measured at a few sizes on first use (about 30 forwards), interpolated
        linearly between them and extended with the last slope beyond; remembered per CPU, thread count and
        model in the cache directory."""
        if self._costs is None:
            self._costs = measured_forward_costs(self)
        sizes, seconds = self._costs
        if n <= sizes[0]:
            return seconds[0]
        for (a, ta), (b, tb) in zip(zip(sizes, seconds), zip(sizes[1:], seconds[1:])):
            if n <= b:
                return ta + (tb - ta) * (n - a) / (b - a)
        (a, ta), (b, tb) = (sizes[-2], seconds[-2]), (sizes[-1], seconds[-1])
        return tb + (tb - ta) * (n - b) / (b - a)


def output_layer(model: torch.nn.Module, output_ids: torch.Tensor | None, pack: bool):
    """(dense weight, bias, kernel or None) of `model`'s output layer over `output_ids` (None: every token).

    A BlockLinear output layer (the default target's GGUF blocks, or a draft's Q8_0 blocks) is its own kernel,
    its rows taken for a reduced vocabulary; the dense weight, the tied embedding, then only sets the dtype.
    Otherwise the kernel is the oneDNN-packed weight where packing applies, else None (a plain linear)."""
    head = model.get_output_embeddings()
    if isinstance(head, BlockLinear):
        weight = model.get_input_embeddings().weight
        if output_ids is None:
            return weight, None, head
        return weight[output_ids].contiguous(), None, head.rows(output_ids)
    weight = head.weight if output_ids is None else head.weight[output_ids].contiguous()
    bias = getattr(head, "bias", None)
    if bias is not None and output_ids is not None:
        bias = bias[output_ids].contiguous()
    if isinstance(head, PackedLinear) and output_ids is None:
        return weight, bias, head._kernel
    if pack and packing_available(weight):
        return weight, bias, PackedWeight(weight, bias)
    return weight, bias, None


class DeviceModelRunner(ModelRunner):
    """A ModelRunner for a model on an accelerator: the core builds token/position/mask tensors on the CPU,
    so they are moved to the model's device here and the logits come back to the CPU."""

    def __init__(self, model, output_ids=None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        super().__init__(model.to(self.device), output_ids)

    @property
    def fuses_many(self) -> bool:
        return False      # forward_many does not move its inputs to the device: callers go one by one

    def forward(self, cache, tokens, positions=None, mask=None, last_only=False):
        if positions is None:
            positions = torch.arange(cache.length, cache.length + tokens.numel())
        dev = self.device
        out = super().forward(cache, tokens.to(dev), positions.to(dev), None if mask is None else mask.to(dev),
                              last_only=last_only)
        return out.cpu()


COST_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def measured_forward_costs(runner: ModelRunner) -> tuple[list[int], list[float]]:
    """(sizes, seconds): the best of 3 timed forwards of each size in COST_SIZES after a 64-token context, measured
    once per CPU, thread count and model (and remembered in the cache directory)."""
    import time

    from .hardware import cpu_key as _cpu_key, remembered

    cfg = runner.model.config
    params = sum(p.numel() for p in runner.model.parameters())
    key = (f"{_cpu_key()}|{cfg.model_type}|{params}|{cfg.num_hidden_layers}|{runner.weights}|{runner.dtype}|"
           f"{type(runner).__name__}|{type(runner._lean).__name__}|{type(runner._head).__name__}|"
           f"{getattr(runner, 'device', 'cpu')}")

    def measure() -> dict:
        vocab = min(runner.vocab_size, 1000)
        seconds = []
        counters = runner.forwards, runner.tokens_fed    # not the runner's work: restored below
        with torch.inference_mode():
            cache = runner.new_cache()
            runner.forward(cache, torch.arange(64) % vocab, last_only=True)
            for n in COST_SIZES:
                tokens = (torch.arange(n) * 7 + 11) % vocab
                best = float("inf")
                for rep in range(4):
                    t0 = time.perf_counter()
                    runner.forward(cache, tokens)
                    if rep:      # the first is a warm-up
                        best = min(best, time.perf_counter() - t0)
                    cache.truncate(64)
                seconds.append(best)
        runner.forwards, runner.tokens_fed = counters
        return {"sizes": list(COST_SIZES), "seconds": [round(x, 6) for x in seconds]}

    found = remembered("forward-costs.json", key, measure)
    seconds = list(found["seconds"])
    for i in range(1, len(seconds)):   # more tokens never cost less: a dip is timing noise
        seconds[i] = max(seconds[i], seconds[i - 1])
    return list(found["sizes"]), seconds
