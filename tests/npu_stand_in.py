"""A stand-in torch_npu for the tests: the ops birkhoff's `npu` backend calls, as torch_npu's docs
(and, for the mHC operators, whose docs give no formula, the golden formulas of the vendor's own
op tests: op-plugin's test_npu_mhc_pre.py and test_npu_mhc_sinkhorn.py; for the fused head's
cross-entropy, whose docs name each output but give no formula, Megatron's vocab-parallel
cross-entropy, which those operators fuse) specify them, in plain torch; it records every call. The
backward operators are autograd through those forward formulas, from what the forward handed
back, not the backend's own backward."""

from __future__ import annotations

import importlib.machinery
import types
from itertools import pairwise

import torch
import torch.nn.functional as F

MHC_OPERATORS = {  # CANN 9's mHC operators, forward and backward
    "npu_mhc_pre",
    "npu_mhc_pre_backward",
    "npu_mhc_sinkhorn",
    "npu_mhc_sinkhorn_backward",
    "npu_mhc_post",
    "npu_mhc_post_backward",
}
HEAD_OPERATORS = {  # the vocabulary-parallel head's, used with the whole vocabulary
    "npu_fused_linear_online_max_sum",
    "npu_fused_cross_entropy_loss_with_max_sum",
    "npu_fused_linear_cross_entropy_loss_with_max_sum_backward",
}
ROUTER_OPERATORS = {"npu_moe_gating_top_k", "npu_moe_gating_top_k_backward"}


class StandIn(types.ModuleType):
    """torch_npu as its docs specify the ops birkhoff calls, in plain torch; records every
    call."""

    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        self.calls: list[str] = []
        self.gating_groups: list[tuple[int, int, int]] = []  # (group_count, k_group, mode)

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append("npu_rms_norm")
        assert gamma.dtype == x.dtype  # "gamma: the same dtype as self"
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
        return x * rstd * gamma, rstd

    def npu_rotary_mul(self, x, r1, r2, rotary_mode="half", rotate=None):
        self.calls.append("npu_rotary_mul")
        assert x.dim() == r1.dim() == r2.dim() == 4 and rotary_mode in ("half", "interleave")
        if rotary_mode == "half":
            x1, x2 = x.chunk(2, dim=-1)
            return r1 * x + r2 * torch.cat((-x2, x1), dim=-1)
        # interleave, BSND: tables 1S1D only, B * N < 1000, D even and below 896
        assert r1.shape == r2.shape == (1, x.shape[1], 1, x.shape[3])
        assert x.shape[0] * x.shape[2] < 1000 and x.shape[3] % 2 == 0 and x.shape[3] < 896
        turned = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return r1 * x + r2 * turned

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, *, atten_mask,
                             scale, keep_prob, sparse_mode):  # fmt: skip
        self.calls.append("npu_fusion_attention")
        assert input_layout == "BNSD" and head_num == query.shape[1] and sparse_mode == 0
        assert keep_prob == 1.0 and head_num % key.shape[1] == 0
        groups = head_num // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = scale * query @ key.transpose(-1, -2)  # atten_mask: True is hidden
        probs = scores.masked_fill(atten_mask, float("-inf")).softmax(-1)
        return probs @ value, None, None, None, 0, 0, 0

    def npu_fusion_attention_v2(self, query, key, value, head_num, input_layout, *,
                                atten_mask=None, scale=1.0, keep_prob=1.0, sparse_mode=0,
                                sink=None):  # fmt: skip
        """The docs' formula in BSND: softmax over scale q k^T (atten_mask True: hidden) and,
        with `sink` (float32, one per head), e^(sink - m) added to the sum; softmax_max and
        softmax_sum (B, N, S, 8) (the row's max and sum, sink included, repeated 8 times)."""
        self.calls.append("npu_fusion_attention_v2")
        assert input_layout == "BSND" and sparse_mode == 0 and keep_prob == 1.0
        assert query.dtype == key.dtype == value.dtype and head_num == query.shape[2]
        assert head_num % key.shape[2] == 0 and key.shape[:3] == value.shape[:3]
        assert query.shape[-1] == key.shape[-1] >= value.shape[-1] and query.shape[-1] <= 768
        assert sink is None or (sink.dtype == torch.float32 and sink.shape == (head_num,))
        assert query.dim() == 4 and min(query.shape[:2]) >= 1  # "B, S from 1"
        if atten_mask is not None:  # "bool or uint8; BNSS, B1SS, 11SS or SS"
            assert atten_mask.dtype in (torch.bool, torch.uint8)
            assert atten_mask.shape[-2:] == (query.shape[1], key.shape[1])
            assert atten_mask.dim() == 2 or atten_mask.shape[1] in (1, head_num)
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))  # BNSD
        groups = head_num // key.shape[2]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = scale * q @ k.transpose(-1, -2)
        if atten_mask is not None:
            scores = scores.masked_fill(atten_mask, float("-inf"))
        largest = scores.amax(-1, keepdim=True)
        if sink is not None:
            largest = torch.maximum(largest, sink.view(1, -1, 1, 1))
        exps = (scores - largest).exp()
        sums = exps.sum(-1, keepdim=True)
        if sink is not None:
            sums = sums + (sink.view(1, -1, 1, 1) - largest).exp()
        out = ((exps / sums) @ v).transpose(1, 2).to(query.dtype)
        stats = [t.detach().expand(*t.shape[:-1], 8).contiguous() for t in (largest, sums)]
        return out, *stats, torch.empty(0), 0, 0, 0

    def npu_sparse_flash_attention(self, query, key, value, sparse_indices, scale_value, *,
                                   sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                                   sparse_mode=3, return_softmax_lse=False):  # fmt: skip
        """The docs' sparse attention in BSND with single-row picks: query (B, S1, N1, D)
        against the rows of key/value (B, S2, N2, D) its KV head's `sparse_indices` (B, S1,
        N2, K) list (int32; valid first, -1 after), softmax over scale q k^T; with
        return_softmax_lse the row's max and sum (B, N2, S1, N1 / N2) float32 (the schema's
        shapes, _meta_registrations.py)."""
        self.calls.append("npu_sparse_flash_attention")
        _, scores, v = _sparse_scores(query, key, value, sparse_indices, scale_value,
                                      sparse_block_size, layout_query, layout_kv)  # fmt: skip
        assert sparse_mode == 0  # 0: everything listed; 3 adds a causal mask
        largest = scores.amax(-1, keepdim=True)
        exps = (scores - largest).exp()
        sums = exps.sum(-1, keepdim=True)
        out = torch.einsum("bshk,bshkd->bshd", exps / sums, v).to(query.dtype)
        if not return_softmax_lse:
            return out, torch.empty(0), torch.empty(0)
        stats = [_per_kv_head(t[..., 0], key.shape[2]) for t in (largest, sums)]
        return out, *stats

    def npu_sparse_flash_attention_grad(self, query, key, value, sparse_indices, d_out, out,
                                        softmax_max, softmax_sum, scale_value,
                                        sparse_block_size, *, layout="BSND",
                                        sparse_mode=3):  # fmt: skip
        """FlashAttention's backward from what it is handed (its registered schema; no docs):
        p = e^(scale q k^T - max) / sum at the listed rows, dv = p^T dout, ds = p (dout v^T -
        rowsum(dout * out)), dq = scale ds k, dk = scale ds^T q, each summed into the rows
        that listed it; (dq, dk, dv, d_query_rope, d_key_rope)."""
        self.calls.append("npu_sparse_flash_attention_grad")
        picked, scores, v = _sparse_scores(query, key, value, sparse_indices, scale_value,
                                           sparse_block_size, layout, layout)  # fmt: skip
        assert sparse_mode == 0 and d_out.shape == out.shape == query.shape
        heads, kv_heads = query.shape[2], key.shape[2]
        largest, sums = (_per_query_head(t, heads) for t in (softmax_max, softmax_sum))
        p = (scores - largest[..., None]).exp() / sums[..., None]  # (B, S1, N1, K)
        dout = d_out.float()
        dots = (dout * out.float()).sum(-1, keepdim=True)
        ds = p * (torch.einsum("bshd,bshkd->bshk", dout, v) - dots)
        k = _listed_rows(key.float(), picked, heads)
        grads = []
        for per_key in (scale_value * torch.einsum("bshk,bshd->bshkd", ds, query.float()),
                        torch.einsum("bshk,bshd->bshkd", p, dout)):  # fmt: skip
            grads.append(_summed_into_rows(per_key, picked, key.shape, kv_heads))
        dq = scale_value * torch.einsum("bshk,bshkd->bshd", ds, k)
        empty = torch.empty(0)
        return dq.to(query.dtype), grads[0].to(key.dtype), grads[1].to(key.dtype), empty, empty

    def npu_sparse_lightning_indexer_grad_kl_loss(
        self, query, key, query_index, key_index, weights, sparse_indices, softmax_max,
        softmax_sum, scale_value, *, query_rope=None, key_rope=None, actual_seq_qlen=None,
        actual_seq_klen=None, layout="BSND", sparse_mode=3, pre_tokens=2**63 - 1,
        next_tokens=2**63 - 1, sinks=None,
    ):  # fmt: skip
        """The docs' and the operator's README's formulas in BSND: at query t's listed keys s
        (valid first, -1 after; sparse mode 3 would hide s > t + S2 - S1: none may be listed),
        I = W @ ReLU(q_I k_I^T)
        and p = sum over heads of e^(scale q k^T - max) / sum, L1-normalised over the list;
        loss = sum over t of KL(p || softmax(I)) (float32, shape (1,)); the gradients of
        query_index, key_index and weights by the README's chain rule, in their dtype."""
        self.calls.append("npu_sparse_lightning_indexer_grad_kl_loss")
        # the README's limits: MQA (one KV head), 8-128 heads of 512, 8-64 indexer heads
        assert layout == "BSND" and sparse_mode == 3 and query_rope is key_rope is None
        half = (torch.bfloat16, torch.float16)
        assert query.dtype in half and all(
            t.dtype == query.dtype for t in (key, query_index, key_index, weights)
        )
        assert query.shape[2] in (8, 16, 32, 64, 128) and query_index.shape[2] in (8, 16, 32, 64)
        assert key.shape[2] == key_index.shape[2] == 1 and query.shape[-1] == key.shape[-1] == 512
        assert sparse_indices.dtype == torch.int32
        assert sparse_indices.shape[:3] == (*query.shape[:2], 1)
        batch, seq, heads, _ = query.shape
        assert softmax_max.shape == softmax_sum.shape == (batch, 1, seq, heads)
        assert softmax_max.dtype == softmax_sum.dtype == torch.float32
        indices = sparse_indices[:, :, 0].long()  # (B, S1, K)
        valid = indices >= 0
        assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "valid indices first, -1 after"
        assert int(indices.max()) < key.shape[1]
        behind = key.shape[1] - seq  # right-down causal: s <= t + S2 - S1 (what it would hide)
        assert not (valid & (indices > torch.arange(seq)[:, None] + behind)).any()
        with torch.autocast("cpu", enabled=False):  # an operator: autocast is torch's
            return self._indexer_kl(query, key, query_index, key_index, weights, indices.clamp(
                min=0), valid, softmax_max[:, 0], softmax_sum[:, 0], scale_value)  # fmt: skip

    @staticmethod
    def _indexer_kl(query, key, query_index, key_index, weights, rows, valid, largest, sums, scale):
        at = torch.arange(query.shape[0])[:, None, None]
        k = key[:, :, 0].float()[at, rows]  # (B, S1, K, D)
        logits = scale * torch.einsum("bshd,bskd->bshk", query.float(), k)
        p = ((logits - largest[..., None]).exp() / sums[..., None]).sum(2)  # (B, S1, K)
        p = p.masked_fill(~valid, 0.0)
        p = p / p.sum(-1, keepdim=True)
        q_i, k_i, w = (t.float() for t in (query_index, key_index[:, :, 0], weights))
        per_key = k_i[at, rows]  # (B, S1, K, D_I)
        s = torch.einsum("bshd,bskd->bshk", q_i, per_key)
        index = torch.einsum("bsh,bshk->bsk", w, s.relu()).masked_fill(~valid, float("-inf"))
        log_q = torch.log_softmax(index, -1)
        loss = torch.where(valid, p * (p.clamp_min(1e-30).log() - log_q), 0.0).sum()
        # the README's gradients: dI = softmax(I) - p, dW = dI ReLU(S)^T, dS = dI W [S > 0],
        # dq = dS k, dk = dS^T q (summed into the rows listed)
        d_index = torch.where(valid, log_q.exp() - p, 0.0)
        d_w = torch.einsum("bsk,bshk->bsh", d_index, s.relu())
        d_s = torch.einsum("bsk,bsh->bshk", d_index, w) * (s > 0)
        d_q = torch.einsum("bshk,bskd->bshd", d_s, per_key)
        d_k = torch.zeros_like(k_i)
        for b in range(query.shape[0]):
            d_k[b].index_add_(
                0, rows[b].flatten(), torch.einsum("shk,shd->skd", d_s[b], q_i[b]).flatten(0, 1)
            )
        grads = (d_q, d_k[:, :, None], d_w)
        dtypes = (query_index.dtype, key_index.dtype, weights.dtype)
        return (*(g.to(d) for g, d in zip(grads, dtypes, strict=True)), loss[None])

    def npu_grouped_matmul(self, x, weight, *, group_list, split_item, group_type,
                           group_list_type):  # fmt: skip
        self.calls.append("npu_grouped_matmul")
        assert (split_item, group_type, group_list_type) == (3, 0, 0)
        bounds = pairwise([0, *group_list.tolist()])
        rows = [x[0][a:b] @ weight[0][e] for e, (a, b) in enumerate(bounds)]
        return [torch.cat(rows)]

    def npu_swiglu(self, x, dim=-1):
        self.calls.append("npu_swiglu")
        a, b = x.chunk(2, dim=dim)  # "A and B: x split in two along dim"
        return a * torch.sigmoid(a) * b

    def npu_moe_token_permute(self, tokens, indices, num_out_tokens=None, padded_mode=False):
        self.calls.append("npu_moe_token_permute")
        # "tokens: bfloat16", "indices: int64", padded_mode "only False"
        assert tokens.dtype == torch.bfloat16 and indices.dtype == torch.int64
        assert num_out_tokens in (None, 0, indices.numel()) and not padded_mode
        # the docs' examples give the sorted indices of a stable sort, as int32
        sorted_indices = indices.flatten().argsort(stable=True).int()
        return tokens[sorted_indices // indices.shape[1]], sorted_indices

    def npu_moe_token_unpermute(self, permuted_tokens, sorted_indices, probs=None,
                                padded_mode=False, restore_shape=None):  # fmt: skip
        self.calls.append("npu_moe_token_unpermute")
        assert permuted_tokens.dtype == torch.bfloat16 and not padded_mode
        assert probs is None or probs.dtype == torch.bfloat16  # "probs: BFLOAT16"
        top_k = 1 if probs is None else probs.shape[1]  # "topK = probs' second dim, else 1"
        rows = torch.zeros_like(permuted_tokens)
        rows = rows.index_copy(0, sorted_indices.long(), permuted_tokens)
        rows = rows.view(-1, top_k, rows.shape[-1])
        return (rows if probs is None else rows * probs.unsqueeze(-1)).sum(1)

    # The vocabulary-parallel head (used with the whole vocabulary): their docs give each
    # output's meaning, not its formula; here Megatron's vocab-parallel cross-entropy, which
    # they fuse: a target outside [start, end) is masked (bit set), its local target 0.

    def npu_fused_linear_online_max_sum(self, input, weight, target, vocab_start_index,
                                        vocab_end_index, return_logits=False):  # fmt: skip
        self.calls.append("npu_fused_linear_online_max_sum")
        # "input: 2-D bfloat16 or float16; weight: 2-D, input's dtype; target 1-D int32/int64"
        assert input.dtype in (torch.bfloat16, torch.float16) and weight.dtype == input.dtype
        assert input.dim() == weight.dim() == 2 and target.dim() == 1
        assert target.dtype in (torch.int32, torch.int64)
        with torch.autocast(input.device.type, enabled=False):  # an operator: autocast's not
            logits = input.float() @ weight.float().T
        outside = (target < vocab_start_index) | (target >= vocab_end_index)
        local = (target - vocab_start_index).masked_fill(outside, 0)
        largest = logits.amax(-1)
        sums = (logits - largest[:, None]).exp().sum(-1)
        picked = logits.gather(1, local[:, None]).squeeze(1).masked_fill(outside, 0.0)
        bits = F.pad(outside, (0, -len(outside) % 8)).view(-1, 8).to(torch.uint8)
        mask = (bits << torch.arange(8, dtype=torch.uint8)).sum(-1).to(torch.uint8)
        kept = logits.to(input.dtype) if return_logits else None
        return largest, sums, picked, mask, local, kept

    def npu_fused_cross_entropy_loss_with_max_sum(self, logits_max, sum_exp_logits,
                                                  predicted_logits, *, label_smoothing=0.0,
                                                  input=None, weight=None,
                                                  vocab_parallel_logits=None):  # fmt: skip
        self.calls.append("npu_fused_cross_entropy_loss_with_max_sum")
        assert label_smoothing == 0.0 and input is None and weight is None  # "only 0 / None"
        assert logits_max.dtype == sum_exp_logits.dtype == predicted_logits.dtype == torch.float32
        assert vocab_parallel_logits is None
        return sum_exp_logits.log() + logits_max - predicted_logits, None

    def npu_fused_linear_cross_entropy_loss_with_max_sum_backward(
        self, grad, input, weight, target_mask, masked_target, label_smoothing=0.0,
        logits_max=None, sum_exp_logits=None, softmax=None,
    ):  # fmt: skip
        self.calls.append("npu_fused_linear_cross_entropy_loss_with_max_sum_backward")
        assert grad.dtype == torch.float32 and grad.shape == masked_target.shape
        assert weight.shape[0] >= 128  # "weight's dim 0 not below 128"
        assert softmax is not None or (logits_max is not None and sum_exp_logits is not None)
        with torch.autocast(input.device.type, enabled=False):
            logits = input.float() @ weight.float().T
        probs = (logits - logits_max[:, None]).exp() / sum_exp_logits[:, None]
        bits = (target_mask[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        inside = bits.flatten()[: len(grad)] == 0
        rows = torch.arange(len(grad))[inside]
        probs[rows, masked_target[inside]] -= 1.0
        grad_logits = probs * grad[:, None]
        with torch.autocast(input.device.type, enabled=False):
            grads = grad_logits @ weight.float(), grad_logits.T @ input.float()
        return tuple(g.to(input.dtype) for g in grads)

    # The MoE router: the docs' equivalent computation (groups of one: ours has none there).

    def npu_moe_gating_top_k(self, x, k, bias=None, input_ids=None, tid2eid=None, k_group=1,
                             group_count=1, group_select_mode=0, renorm=0, norm_type=0,
                             out_flag=False, routed_scaling_factor=1.0, eps=1e-20):  # fmt: skip
        self.calls.append("npu_moe_gating_top_k")
        self.gating_groups.append((group_count, k_group, group_select_mode))
        assert x.dim() == 2 and 3 <= x.shape[-1] <= 2048 and renorm == 0
        assert bias is None or (bias.dtype == x.dtype and bias.shape == x.shape[-1:])
        assert norm_type in (0, 1) and group_select_mode in (0, 1)
        # group_count: divides the experts, more than 2 a group, the group rounded up to 32
        # experts times the groups at most 2048; 1 <= k_group <= group_count; k fits the groups
        experts, per = x.shape[-1], x.shape[-1] // group_count
        assert experts % group_count == 0 and (group_count == 1 or per > 2)
        assert -(-per // 32) * 32 * group_count <= 2048 and 1 <= k_group <= group_count
        assert 1 <= k <= per * k_group
        scores = x.float().sigmoid() if norm_type == 1 else x.float().softmax(-1)
        if tid2eid is not None:  # hash mode: "expert indices looked up from tid2eid"
            assert input_ids.shape == x.shape[:1] and tid2eid.shape[-1] == k
            ids = tid2eid[input_ids]
        else:
            biased = scores if bias is None else scores + bias.float()
            if group_count > 1:  # groups scored by their best (mode 0) or best two (mode 1)
                grouped = biased.unflatten(-1, (group_count, per))
                best = grouped.topk(1 + group_select_mode, dim=-1).values.sum(-1)
                kept = torch.argsort(-best, dim=-1, stable=True)[:, :k_group]
                out = torch.ones_like(best, dtype=torch.bool).scatter(-1, kept, False)
                biased = grouped.masked_fill(out[..., None], float("-inf")).flatten(-2)
            ids = torch.argsort(-biased, dim=-1, stable=True)[:, :k]
        chosen = scores.gather(1, ids.long())
        if norm_type == 1:
            chosen = chosen / (chosen.sum(-1, keepdim=True) + eps)
        weights = (chosen * routed_scaling_factor).to(x.dtype)
        return weights, ids.int(), scores if out_flag else None

    def npu_moe_gating_top_k_backward(self, x_norm, grad_y, expertIdx, *, renorm=0, norm_type=0,
                                      routed_scaling_factor=1.0, eps=1e-20):  # fmt: skip
        self.calls.append("npu_moe_gating_top_k_backward")
        assert norm_type == 1 and x_norm.dtype == torch.float32 and expertIdx.dtype == torch.int32
        assert grad_y.is_contiguous() and expertIdx.is_contiguous()  # "no non-contiguous"
        scores = x_norm.detach().requires_grad_()
        with torch.enable_grad():
            chosen = scores.gather(1, expertIdx.long())
            weights = chosen / (chosen.sum(-1, keepdim=True) + eps) * routed_scaling_factor
            (grad,) = torch.autograd.grad(weights, scores, grad_y.float())
        return (grad * x_norm * (1 - x_norm)).to(grad_y.dtype)

    # mHC (CANN 9's operators). Shapes as documented: streams (T, n, D) or (B, S, n, D) in
    # bfloat16 or float16; phi (n^2 + 2n, n D), alpha (3,), bias (n^2 + 2n,) and every mapping
    # float32. The Sinkhorn's saved iterates and sums: 1-D, as the backward's docs give them
    # (their layout is the operators' own; here 2 iters x n x n x tokens and 2 iters x n x
    # tokens, which the backend only hands back).

    def npu_mhc_pre(self, x, phi, alpha, bias, *, gamma=None, norm_eps=1e-6, hc_eps=1e-6,
                    out_flag=0, inner_precise=0):  # fmt: skip
        self.calls.append("npu_mhc_pre")
        assert x.dtype in (torch.bfloat16, torch.float16) and x.dim() in (3, 4)
        assert phi.dtype == alpha.dtype == bias.dtype == torch.float32 and alpha.shape == (3,)
        assert gamma is None and inner_precise == 0 and out_flag in (0, 1)
        h_in, h_post, h_res, inv_rms, h_mix, h_pre = self._mhc_pre(
            x.float(), phi, alpha, bias, norm_eps, hc_eps
        )
        optional = (inv_rms, h_mix, h_pre) if out_flag else (None, None, None)
        return h_in.to(x.dtype), h_post, h_res, *optional

    @staticmethod
    def _mhc_pre(x, phi, alpha, bias, norm_eps, hc_eps):
        """The golden formula of the vendor's test (float32; x already float)."""
        *batch, n, width = x.shape
        flat = x.reshape(-1, n * width)
        inv_rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
        h_mix = F.linear(flat, phi)
        pre, post, res = (h_mix * inv_rms).split([n, n, n * n], dim=-1)
        h_pre = torch.sigmoid(pre * alpha[0] + bias[:n]) + hc_eps
        h_post = 2 * torch.sigmoid(post * alpha[1] + bias[n : 2 * n])
        h_res = res.unflatten(-1, (n, n)) * alpha[2] + bias[2 * n :].view(n, n)
        h_in = (h_pre.unsqueeze(-1) * flat.unflatten(-1, (n, width))).sum(1)
        shaped = (h_in.view(*batch, width), h_post.view(*batch, n), h_res.view(*batch, n, n))
        return *shaped, inv_rms.view(batch), h_mix.view(*batch, -1), h_pre.view(*batch, n)

    def npu_mhc_pre_backward(self, x, phi, alpha, grad_h_in, grad_h_post, grad_h_res, inv_rms,
                             h_mix, h_pre, h_post, gamma=None, hc_eps=1e-6,
                             grad_x_post=None):  # fmt: skip
        """Autograd through the golden formula. The biases are not handed back: the sigmoids'
        arguments are, as logit(h_pre - hc_eps) and logit(h_post / 2), and H_res is linear in
        its bias, so a bias with the same gradient is rebuilt from them."""
        self.calls.append("npu_mhc_pre_backward")
        assert gamma is None and grad_h_in.dtype == x.dtype and h_mix.shape[-1] == phi.shape[0]
        n = x.shape[-2]
        leaves = [x.float(), phi, alpha]
        leaves = [t.detach().requires_grad_() for t in leaves]
        weight = (h_mix * inv_rms.unsqueeze(-1)).reshape(-1, 2 * n + n * n)
        at_pre = torch.logit(h_pre.reshape(-1, n) - hc_eps) - alpha[0] * weight[:, :n]
        at_post = torch.logit(h_post.reshape(-1, n) / 2) - alpha[1] * weight[:, n : 2 * n]
        biases = [at_pre.mean(0), at_post.mean(0), torch.zeros(n * n)]  # per token: constant
        bias = torch.cat(biases).detach().requires_grad_()
        with torch.enable_grad():  # the backend calls it from a backward (no grad mode)
            outputs = self._mhc_pre(*leaves, bias, _norm_eps(x, inv_rms), hc_eps)[:3]
            grads = (grad_h_in.float(), grad_h_post, grad_h_res)
            grads = torch.autograd.grad(outputs, (*leaves, bias), grads)
        grad_x = grads[0] + (0 if grad_x_post is None else grad_x_post.float())
        return grad_x.to(x.dtype), grads[1], grads[2], grads[3], None

    def npu_mhc_sinkhorn(self, x, *, eps=1e-6, num_iters=20, out_flag=0):
        self.calls.append("npu_mhc_sinkhorn")
        assert x.dtype == torch.float32 and x.shape[-1] == x.shape[-2] in (4, 6, 8)
        assert 1 <= num_iters <= 100 and x.dim() in (3, 4)
        n, batch = x.shape[-1], x.shape[:-2]
        iterates, sums = _sinkhorn_steps(x.reshape(-1, n, n), eps, num_iters)
        y = iterates[-1].view(x.shape)
        if not out_flag:
            return y, None, None
        saved = torch.stack(iterates).movedim(1, -1).flatten()  # tokens last
        saved_sums = torch.stack(sums).movedim(1, -1).flatten()
        assert saved.numel() == 2 * num_iters * n * n * batch.numel()
        return y, saved, saved_sums

    def npu_mhc_sinkhorn_backward(self, grad_y, norm, sum):  # the docs' names
        """Autograd through the iterations replayed from the first iterate, softmax + eps,
        then the softmax's own vector-Jacobian product."""
        self.calls.append("npu_mhc_sinkhorn_backward")
        n, tokens = grad_y.shape[-1], grad_y[..., 0, 0].numel()
        assert norm.dim() == sum.dim() == 1 and grad_y.dtype == torch.float32
        iters2 = norm.numel() // (n * n * tokens)
        assert norm.numel() == iters2 * n * n * tokens and sum.numel() == iters2 * n * tokens
        first = norm.view(iters2, n, n, tokens)[0].movedim(-1, 0)  # (tokens, n, n)
        eps = (first.sum(-1) - 1).mean().item()  # softmax rows sum to 1: + n eps
        eps /= n
        start = first.detach().requires_grad_()
        with torch.enable_grad():
            *_, last = _sinkhorn_from(start, eps, iters2 // 2)
            (d_first,) = torch.autograd.grad(last, start, grad_y.reshape(-1, n, n))
        p = first - eps
        d_x = p * (d_first - (d_first * p).sum(-1, keepdim=True))
        return d_x.reshape(grad_y.shape)

    def npu_mhc_post(self, x, h_res, h_out, h_post):
        self.calls.append("npu_mhc_post")
        assert x.dtype in (torch.bfloat16, torch.float16) and h_out.dtype == x.dtype
        assert h_res.dtype == h_post.dtype == torch.float32
        return self._mhc_post(x.float(), h_res, h_out.float(), h_post).to(x.dtype)

    @staticmethod
    def _mhc_post(x, h_res, h_out, h_post):
        """The docs' formula: x_{l+1} = H_res^T x_l + h_out (x) H_post."""
        return h_res.transpose(-1, -2) @ x + h_post.unsqueeze(-1) * h_out.unsqueeze(-2)

    def npu_mhc_post_backward(self, grad_y, x, h_res=None, h_out=None, h_post=None):
        self.calls.append("npu_mhc_post_backward")
        assert grad_y.dtype == x.dtype and h_res is not None
        leaves = [t.detach().float().requires_grad_() for t in (x, h_res, h_out, h_post)]
        with torch.enable_grad():
            grads = torch.autograd.grad(self._mhc_post(*leaves), leaves, grad_y.float())
        return tuple(g.to(t.dtype) for g, t in zip(grads, (x, h_res, h_out, h_post), strict=True))


def _norm_eps(x: torch.Tensor, inv_rms: torch.Tensor) -> float:
    """The RMS eps the forward used, from its 1 / rms (the backward operator is not given it)."""
    flat = x.float().reshape(inv_rms.numel(), -1)
    return (inv_rms.reshape(-1).pow(-2) - flat.square().mean(-1)).mean().item()


def _sinkhorn_from(start: torch.Tensor, eps: float, iters: int) -> list[torch.Tensor]:
    """The golden Sinkhorn's iterates after its softmax + eps: columns summed first (dim -2),
    then iters - 1 times rows and columns, each sum + eps."""
    iterates = [start]
    for dim in (-2, *(-1, -2) * (iters - 1)):
        iterates.append(iterates[-1] / (iterates[-1].sum(dim, keepdim=True) + eps))
    return iterates


def _sinkhorn_steps(x: torch.Tensor, eps: float, iters: int):
    """The golden formula's 2 iters iterates (softmax + eps first) and the sums each divided
    by (the first, none: the softmax's, kept as the rows' sums of the first iterate)."""
    iterates = _sinkhorn_from(torch.softmax(x, dim=-1) + eps, eps, iters)
    sums = [iterates[0].sum(-1)]
    for step, dim in zip(iterates[:-1], (-2, *(-1, -2) * (iters - 1)), strict=True):
        sums.append(step.sum(dim) + eps)
    return iterates, sums


def _sparse_scores(query, key, value, indices, scale, block, layout_q, layout_kv):
    """The sparse operators' shared checks (their docs, schema and the operator's README in
    ops-transformer: bf16 out, query heads a power of two to 128, one KV head, 512 channels)
    and scale q k^T at the listed rows, -inf where a list holds -1; the listed values;
    (B, S1, N1, K) indices."""
    assert layout_q == layout_kv == "BSND" and block == 1
    assert query.dtype == key.dtype == value.dtype == torch.bfloat16
    assert query.shape[2] in (1, 2, 4, 8, 16, 32, 64, 128) and key.shape[2] == 1
    assert query.shape[-1] == key.shape[-1] == value.shape[-1] == 512
    assert all(t.is_contiguous() for t in (query, key, value, indices))
    assert indices.dtype == torch.int32 and indices.shape[:3] == (*query.shape[:2], key.shape[2])
    valid = indices >= 0
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "valid indices first, -1 after"
    assert int(indices.max()) < key.shape[1]
    heads = query.shape[2]
    picked = indices.long().clamp(min=0).repeat_interleave(heads // key.shape[2], dim=2)
    k, v = (_listed_rows(t.float(), picked, heads) for t in (key, value))
    scores = scale * torch.einsum("bshd,bshkd->bshk", query.float(), k)
    hidden = ~valid.repeat_interleave(heads // key.shape[2], dim=2)
    return picked, scores.masked_fill(hidden, float("-inf")), v


def _listed_rows(rows: torch.Tensor, picked: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S2, N2, D) rows at (B, S1, N1, K) indices -> (B, S1, N1, K, D), each query head
    reading its KV head's rows."""
    batch, _, kv_heads, dim = rows.shape
    head = torch.arange(heads, device=rows.device) // (heads // kv_heads)
    flat = rows.transpose(1, 2).reshape(batch, -1, dim)  # (B, N2 S2, D)
    at = picked + (head * rows.shape[1])[None, None, :, None]
    return flat.gather(1, at.flatten(1)[..., None].expand(-1, -1, dim)).view(*at.shape, dim)


def _summed_into_rows(per_key, picked, shape, kv_heads) -> torch.Tensor:
    """(B, S1, N1, K, D) contributions summed into the (B, S2, N2, D) rows that were listed
    (a -1 entry's contribution is 0: its probability is)."""
    batch, rows, _, dim = shape
    heads = picked.shape[2]
    head = torch.arange(heads, device=picked.device) // (heads // kv_heads)
    at = picked + (head * rows)[None, None, :, None]
    total = per_key.new_zeros(batch, kv_heads * rows, dim)
    for b in range(batch):
        total[b].index_add_(0, at[b].flatten(), per_key[b].flatten(0, 2))
    return total.view(batch, kv_heads, rows, dim).transpose(1, 2)


def _per_kv_head(stat: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, S1, N1) -> (B, N2, S1, N1 / N2): the operators' layout of softmax_max and sum."""
    batch, seq, heads = stat.shape
    return stat.view(batch, seq, kv_heads, heads // kv_heads).transpose(1, 2).contiguous()


def _per_query_head(stat: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N2, S1, G) -> (B, S1, N1)."""
    return stat.transpose(1, 2).reshape(stat.shape[0], stat.shape[2], heads)
