"""Asking a causal LM to classify in its own words (the `prompt` task type, tunelab.tasks.prompt).

A label's score is the log-likelihood of its words (the verbalizer) right after the prompt: a word of several
tokens scores the sum of its tokens' log-probabilities, or their mean (length normalisation, so that long
words are not penalised for their length); a label of several words scores the log of their summed
probabilities (logsumexp: the label is said if any of its words is). Probabilities over the labels are the
softmax of these scores. Contextual calibration (Zhao et al. 2021) divides them by the probabilities the same
prompt gives a content-free input ("N/A"), which removes the prompt's own bias towards some labels.

Prompts are scored left-padded, so that every row's next word starts at the same position and the LM head
runs on the last position only (`logits_to_keep`), not over the whole vocabulary at every position; words of
several tokens continue the prompts' key/value cache rather than running the prompts again per word.
Position ids follow the attention mask (counting real tokens), so absolute-position models (GPT-2) see the
same positions as unpadded; rotary models (Llama, Gemma) are unaffected by the shift anyway.
"""

import functools
import inspect

import torch


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): the rows right-aligned in a (rows, longest) tensor, padding on the left."""
    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, longest - len(row):], mask[r, longest - len(row):] = torch.tensor(row), 1
    return ids, mask


def to_left_padding(batch: dict) -> dict:
    """A right-padded batch (tunelab.data.batching.collate's) moved to left padding: each row rolled right by
    its padding. input_ids or inputs_embeds (a perturbation's), and attention_mask."""
    mask = batch["attention_mask"]
    n, longest = mask.shape
    shift = longest - mask.sum(-1, keepdim=True)  # (rows, 1) pads per row
    index = (torch.arange(longest, device=mask.device).unsqueeze(0) - shift) % longest
    out = dict(batch)
    for key in ("input_ids", "attention_mask"):
        if key in batch:
            out[key] = batch[key].gather(1, index)
    if "inputs_embeds" in batch:
        e = batch["inputs_embeds"]
        out["inputs_embeds"] = e.gather(1, index.unsqueeze(-1).expand(-1, -1, e.shape[-1]))
    return out


def _parameters(forward) -> set:
    """The keyword parameters of the model under `forward` (a peft or DDP wrapper passes keyword arguments
    through to it)."""
    target = getattr(forward, "module", forward)  # DDP
    target = getattr(target, "get_base_model", lambda: target)()  # peft
    try:
        return set(inspect.signature(target.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _keeps_logits(forward) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    return "logits_to_keep" in _parameters(forward)


def _prompt_learning(forward) -> bool:
    """A peft prompt/prefix-tuning model: it puts its virtual tokens before the input and numbers the positions
    itself (it ignores position ids given to it)."""
    target = getattr(forward, "module", forward)
    return bool(getattr(getattr(target, "active_peft_config", None), "is_prompt_learning", False))


def _run(forward, keep: int, **inputs):
    """The model's output with the last `keep` positions' logits (rows, keep, vocab)."""
    mask = inputs["attention_mask"]
    if not _prompt_learning(forward):
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if _keeps_logits(forward):
        inputs["logits_to_keep"] = keep
    return forward(**inputs)


def word_scores(forward, words: list[list[int]], normalize: bool, input_ids=None, attention_mask=None,
                inputs_embeds=None, embed=None) -> torch.Tensor:
    """(rows, words): each word's log-likelihood after each left-padded prompt (mean per token when
    `normalize`). One forward pass over the prompts gives every word's first token; the later tokens of the
    words of several tokens come from one more, short pass over those words alone, continuing the prompts'
    key/value cache (repeated once per such word). A peft prompt-learning model, which puts its own virtual
    tokens before the input, scores each word appended to the prompts instead (`embed(ids)` gives the
    embeddings to append to inputs_embeds)."""
    multi = [n for n, w in enumerate(words) if len(w) > 1]
    if multi and _prompt_learning(forward):
        return _appended_word_scores(forward, words, normalize, input_ids, attention_mask, inputs_embeds, embed)
    inputs = {"attention_mask": attention_mask, "use_cache": bool(multi)} | (
        {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids})
    out = _run(forward, 1, **inputs)
    first = out.logits[:, -1].float().log_softmax(-1)
    scores = first[:, [w[0] for w in words]]
    if not multi:
        return scores
    rows, device, m = attention_mask.shape[0], attention_mask.device, len(multi)
    longest = max(len(words[n]) for n in multi) - 1  # continuation tokens: a word's tokens but its last
    cont = torch.zeros((rows * m, longest), dtype=torch.long, device=device)
    valid = torch.zeros_like(cont)
    for j, n in enumerate(multi):  # row r's continuation with word j sits at r * m + j (repeat_interleave)
        w = torch.tensor(words[n][:-1], device=device)
        cont[j::m, :len(w)], valid[j::m, :len(w)] = w, 1
    # transformers 5.2x names the key/value cache `cache` (`past_key_values` before, still taken by some models)
    name = "cache" if "cache" in _parameters(forward) else "past_key_values"
    cache = getattr(out, name)
    cache.batch_repeat_interleave(m)
    before = attention_mask.repeat_interleave(m, 0)
    positions = before.sum(-1, keepdim=True) + torch.arange(longest, device=device)
    later = forward(input_ids=cont, attention_mask=torch.cat([before, valid], 1), position_ids=positions,
                    use_cache=False, **{name: cache}).logits.float().log_softmax(-1)
    scores = scores.clone()
    for j, n in enumerate(multi):
        w = words[n]
        target = torch.tensor(w[1:], device=device)
        rest = later[j::m, :len(w) - 1].gather(-1, target.view(1, -1, 1).expand(rows, -1, 1)).squeeze(-1)
        total = scores[:, n] + rest.sum(-1)
        scores[:, n] = total / len(w) if normalize else total
    return scores


def _appended_word_scores(forward, words, normalize, input_ids, attention_mask, inputs_embeds, embed):
    """word_scores by running every prompt once per word with the word appended (left-padded together)."""
    rows, device = attention_mask.shape[0], attention_mask.device
    longest = max(map(len, words))
    parts_ids, parts_mask = [], []
    for w in words:  # prompt rows + the word, padded on the left to a common length
        k = len(w)
        word = torch.tensor(w, device=device).expand(rows, k)
        lead = longest - k
        parts_mask.append(torch.cat([attention_mask.new_zeros(rows, lead), attention_mask,
                                     attention_mask.new_ones(rows, k)], 1))
        if inputs_embeds is not None:
            if embed is None:
                raise ValueError("scoring words of several tokens on inputs_embeds needs `embed`")
            e = inputs_embeds
            parts_ids.append(torch.cat([e.new_zeros(rows, lead, e.shape[-1]), e, embed(word).to(e.dtype)], 1))
        else:
            parts_ids.append(torch.cat([input_ids.new_zeros(rows, lead), input_ids, word], 1))
    # (words * rows, ...) word-major
    key = "inputs_embeds" if inputs_embeds is not None else "input_ids"
    logits = _run(forward, longest + 1, **{key: torch.cat(parts_ids), "attention_mask": torch.cat(parts_mask),
                                           "use_cache": False}).logits[:, -(longest + 1):]
    logp = logits.float().log_softmax(-1)  # kept position j predicts the token at (end - longest - 1 + j + 1)
    out = []
    for n, w in enumerate(words):
        k = len(w)
        lp = logp[n * rows:(n + 1) * rows]
        target = torch.tensor(w, device=device)
        # the word's i-th token is predicted at kept position longest - k + i
        picked = lp[:, longest - k:longest, :].gather(-1, target.view(1, k, 1).expand(rows, k, 1)).squeeze(-1)
        out.append(picked.mean(-1) if normalize else picked.sum(-1))
    return torch.stack(out, 1)


def label_scores(word_score: torch.Tensor, word_label: list[int], n_labels: int) -> torch.Tensor:
    """(rows, labels): per label, the logsumexp of its words' scores."""
    index = torch.tensor(word_label, device=word_score.device)
    out = word_score.new_full((word_score.shape[0], n_labels), float("-inf"))
    for label in range(n_labels):
        out[:, label] = word_score[:, index == label].logsumexp(-1)
    return out


def calibrated(probs, content_free):
    """Contextual calibration: probabilities (rows, labels) divided by the content-free input's (labels,) and
    renormalised (Zhao et al. 2021's W = diag(p_cf)^-1, b = 0)."""
    import numpy as np

    p = np.asarray(probs, dtype=np.float64) / np.maximum(np.asarray(content_free, dtype=np.float64), 1e-12)
    return p / p.sum(-1, keepdims=True)


def softmax(scores):
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@functools.lru_cache(maxsize=2)
def _retriever(model_name: str):
    """(tokenizer, encoder) of a retriever, loaded once per process (each evaluation asks again)."""
    from transformers import AutoModel

    from tunelab.models.files import load_tokenizer, quiet_transformers, require_weights, resolve_model_path

    path = resolve_model_path(model_name)
    require_weights(path)
    quiet_transformers()
    return load_tokenizer(path), AutoModel.from_pretrained(str(path), use_safetensors=True).eval()


@torch.inference_mode()
def embed_texts(model_name: str, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (mean of the last hidden states over real tokens, unit length) from an encoder such
    as the packaged all-MiniLM-L6-v2: the retriever of similar demonstrations."""
    tokenizer, model = _retriever(model_name)
    out = []
    for k in range(0, len(texts), batch_size):
        enc = tokenizer(texts[k:k + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 1)
