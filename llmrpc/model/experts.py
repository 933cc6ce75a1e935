"""Mixtures of experts, shared by the family graph builders: the router's choice, the chosen
experts' FFNs in one ``ggml_mul_mat_id`` each, shared experts and group-limited routing
(llama.cpp's ``build_moe_ffn``)."""

from __future__ import annotations

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.graph import Act, BuilderBase
from llmrpc.model.hparams import Gating


class ExpertOps(BuilderBase):
    def shared_expert(self, x: g.Tensor, il: int) -> g.Tensor:
        """The layer's shared expert: a SwiGLU FFN every row goes through next to the routed ones."""
        up, gate, down = (self.w(kind, il) for kind in (T.FFN_UP_SHEXP, T.FFN_GATE_SHEXP, T.FFN_DOWN_SHEXP))
        return self.ffn(x, il, up, gate, down, Act.SILU, label="ffn_shexp")

    def moe(
        self, x: g.Tensor, il: int, act: Act = Act.SILU, gating: Gating = Gating.SOFTMAX,
        norm_weights: bool = False, weights_scale: float = 0.0, biased: bool = False,
        probs_bias: g.Tensor | None = None,
    ) -> g.Tensor:  # fmt: skip
        """A mixture of experts (llama.cpp's ``build_moe_ffn``): the router picks the top
        ``n_expert_used`` experts per row, each runs its FFN (``ggml_mul_mat_id``), and their
        outputs are summed with the router's weights. ``biased``: the router and the experts
        have biases (gpt-oss)."""
        lib, ctx, hp = self.lib, self.ctx, self.hp
        n_embd, n = x.contents.ne[0], x.contents.ne[1]  # rows: fewer than the batch's after out_rows
        n_exp, n_used = hp.n_expert, hp.n_expert_used

        def bias(kind: T) -> g.Tensor | None:
            return self.w(kind, il, "bias") if biased else None

        logits = self.add(self.mm(self.w(T.FFN_GATE_INP, il), x), bias(T.FFN_GATE_INP))
        if gating is Gating.SOFTMAX:
            probs = lib.ggml_soft_max(ctx, logits)
        elif gating is Gating.SIGMOID:
            probs = lib.ggml_sigmoid(ctx, logits)
        elif gating is Gating.SOFTMAX_WEIGHT:
            probs = logits
        else:
            raise ValueError(f"{hp.arch}: expert gating {gating!r} is not supported")
        selection = lib.ggml_add(ctx, probs, probs_bias) if probs_bias is not None else probs
        if hp.n_expert_groups > 1:
            selection = self._best_groups(selection, n)
        selected = lib.ggml_argsort_top_k(ctx, selection, n_used)  # I32 [n_used, n]
        probs = lib.ggml_reshape_3d(ctx, probs, 1, n_exp, n)
        weights = lib.ggml_get_rows(ctx, probs, selected)  # [1, n_used, n]
        if gating is Gating.SOFTMAX_WEIGHT:
            weights = lib.ggml_reshape_2d(ctx, weights, n_used, n)
            weights = lib.ggml_reshape_3d(ctx, lib.ggml_soft_max(ctx, weights), 1, n_used, n)
        if norm_weights:
            weights = lib.ggml_reshape_2d(ctx, weights, n_used, n)
            total = lib.ggml_clamp(ctx, lib.ggml_sum_rows(ctx, weights), 6.103515625e-5, float("inf"))
            weights = lib.ggml_reshape_3d(ctx, lib.ggml_div(ctx, weights, total), 1, n_used, n)
        if weights_scale not in (0.0, 1.0):
            weights = self.scale(weights, weights_scale)
        lib.ggml_build_forward_expand(self.gf, weights)

        cur = lib.ggml_reshape_3d(ctx, x, n_embd, 1, n)

        def experts(kind: T, inp: g.Tensor) -> g.Tensor:
            out = lib.ggml_mul_mat_id(ctx, self.w(kind, il), inp, selected)
            b = bias(kind)
            return out if b is None else lib.ggml_add_id(ctx, out, b, selected)

        if self.opt(T.FFN_GATE_UP_EXP, il) is not None:  # gate and up in one matrix
            gate_up = experts(T.FFN_GATE_UP_EXP, cur)
            c = gate_up.contents
            half = c.ne[0] // 2
            gate = lib.ggml_view_3d(ctx, gate_up, half, c.ne[1], c.ne[2], c.nb[1], c.nb[2], 0)
            up = lib.ggml_view_3d(ctx, gate_up, half, c.ne[1], c.ne[2], c.nb[1], c.nb[2], half * c.nb[0])
        else:
            up = experts(T.FFN_UP_EXP, cur)
            gate = experts(T.FFN_GATE_EXP, cur) if self.opt(T.FFN_GATE_EXP, il) is not None else None
        if act is Act.SILU:
            cur = lib.ggml_swiglu_split(ctx, gate, up) if gate is not None else lib.ggml_silu(ctx, up)
        elif act is Act.GELU:
            cur = lib.ggml_geglu_split(ctx, gate, up) if gate is not None else lib.ggml_gelu(ctx, up)
        elif act is Act.SWIGLU_OAI:
            cur = lib.ggml_swiglu_oai(ctx, gate, up, 1.702, 7.0)
        else:
            raise ValueError(f"{act} is not an expert activation")
        out = lib.ggml_mul(ctx, experts(T.FFN_DOWN_EXP, cur), weights)  # [n_embd, n_used, n]
        lib.ggml_build_forward_expand(self.gf, out)
        views = [lib.ggml_view_2d(ctx, out, n_embd, n, out.contents.nb[2], i * out.contents.nb[1])
                 for i in range(n_used)]  # fmt: skip
        for view in views:
            lib.ggml_build_forward_expand(self.gf, view)
        moe_out = views[0]
        for view in views[1:]:
            moe_out = lib.ggml_add(ctx, moe_out, view)
            lib.ggml_build_forward_expand(self.gf, moe_out)
        if n_used == 1:
            moe_out = lib.ggml_cont(ctx, moe_out)
        return self.name(moe_out, "ffn_moe_out", il)

    def _best_groups(self, selection: g.Tensor, n: int) -> g.Tensor:
        """Only the experts of the ``n_group_used`` groups whose two best experts score
        highest stay selectable (DeepSeek V3's group-limited routing)."""
        lib, ctx, hp = self.lib, self.ctx, self.hp
        n_groups = hp.n_expert_groups
        per_group = hp.n_expert // n_groups
        groups = lib.ggml_reshape_3d(ctx, selection, per_group, n_groups, n)
        top2 = lib.ggml_argsort_top_k(ctx, groups, 2)  # [2, n_groups, n]
        scores = lib.ggml_get_rows(ctx, lib.ggml_reshape_4d(ctx, groups, 1, per_group, n_groups, n), top2)
        c = scores.contents
        scores = lib.ggml_sum_rows(ctx, lib.ggml_reshape_3d(ctx, scores, c.ne[1], c.ne[2], c.ne[3]))
        c = scores.contents
        scores = lib.ggml_reshape_2d(ctx, scores, c.ne[1], c.ne[2])  # [n_groups, n]
        best = lib.ggml_argsort_top_k(ctx, scores, hp.n_group_used)
        kept = lib.ggml_get_rows(ctx, groups, best)  # [per_group, n_group_used, n]
        masked = lib.ggml_set_rows(ctx, lib.ggml_fill(ctx, groups, float("-inf")), kept, best)
        return lib.ggml_reshape_2d(ctx, masked, hp.n_expert, n)
