"""Text generation on the router: the dense part of the model (embeddings, attention with a paged
KV cache, norms, dense MLP layers, LM head, sampling) runs here, and every MoE layer goes to the
expert pool through the same distributed layer as the layer API.

- `params`: what a request may ask for (`SamplingParams`), checked once for every edge.
- `scheduler`: the pure continuous-batching decision (which sequences run a step, how many
  tokens each, which blocks they need, which are preempted).
- `kv_cache`, `attention`: the paged KV cache and the attention over it, plugged into
  `transformers`' own attention modules.
- `dense_model`: the checkpoint's `transformers` model without its MoE blocks.
- `sampling`, `detokenizer`: pure token choice, and text out with stop strings.
- `engine`: the loop that schedules, runs a step and streams each request's output.
"""
