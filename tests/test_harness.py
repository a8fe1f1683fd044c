"""The CPU harness is honest: real megatron-core code on gloo equals single-process torch.

Each test runs unmodified megatron-core (tensor-parallel linears, the 1F1B
pipeline schedule, DDP + distributed optimizer) in real processes and compares
loss and gradients / weights with a plain single-process reference in fp32.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.slow

RTOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tp_linears_body(env):
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)
    w1, b1 = torch.randn(12, 8), torch.randn(12)
    w2, b2 = torch.randn(6, 12), torch.randn(6)
    x = torch.randn(5, 3, 8)

    # single-process reference
    xr = x.clone().requires_grad_(True)
    ref1, ref2 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 6)
    with torch.no_grad():
        ref1.weight.copy_(w1), ref1.bias.copy_(b1), ref2.weight.copy_(w2), ref2.bias.copy_(b2)
    yr = ref2(F.gelu(ref1(xr)))
    (yr.square().sum()).backward()

    cfg = ModelParallelConfig(tensor_model_parallel_size=env.tp, use_cpu_initialization=True, params_dtype=torch.float32)
    init = torch.nn.init.zeros_
    col = ColumnParallelLinear(8, 12, config=cfg, init_method=init, bias=True, gather_output=False)
    row = RowParallelLinear(12, 6, config=cfg, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False)
    r, n = env.tp_rank, 12 // env.tp
    with torch.no_grad():
        col.weight.copy_(w1[r * n : (r + 1) * n]), col.bias.copy_(b1[r * n : (r + 1) * n])
        row.weight.copy_(w2[:, r * n : (r + 1) * n]), row.bias.copy_(b2)
    xm = x.clone().requires_grad_(True)
    h, _ = col(xm)
    y, _ = row(F.gelu(h))
    (y.square().sum()).backward()

    errs = {
        "out": rel_err(y, yr),
        "dx": rel_err(xm.grad, xr.grad),
        "dw1": rel_err(col.weight.grad, ref1.weight.grad[r * n : (r + 1) * n]),
        "db1": rel_err(col.bias.grad, ref1.bias.grad[r * n : (r + 1) * n]),
        "dw2": rel_err(row.weight.grad, ref2.weight.grad[:, r * n : (r + 1) * n]),
        "db2": rel_err(row.bias.grad, ref2.bias.grad),
    }
    return errs


def test_tp2_column_row_parallel_linear_matches_nn_linear():
    for errs in run_distributed(_tp_linears_body, 2, tp=2):
        assert max(errs.values()) < RTOL, errs


class _Stack(torch.nn.Module):
    """Layers [first, last) of a tanh MLP stack, with megatron's set_input_tensor hook."""

    def __init__(self, config, weights, first, last, is_first):
        super().__init__()
        from megatron.core.enums import ModelType

        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.layers = torch.nn.ModuleList()
        for w, b in weights[first:last]:
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w), lin.bias.copy_(b)
            self.layers.append(lin)
        self.is_first = is_first
        self.input_tensor = None

    def set_input_tensor(self, t):
        self.input_tensor = t[0] if isinstance(t, (list, tuple)) else t

    def forward(self, x):
        h = x if self.is_first else self.input_tensor
        for lin in self.layers:
            h = torch.tanh(lin(h))
        return h


def _stack_weights(hidden, num_layers):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(hidden, hidden, generator=g) * 0.5, torch.randn(hidden, generator=g)) for _ in range(num_layers)]


def _mb_data(num_mb, seq, mbs, hidden):
    g = torch.Generator().manual_seed(2)
    return [{"x": torch.randn(seq, mbs, hidden, generator=g), "y": torch.randn(seq, mbs, hidden, generator=g)} for _ in range(num_mb)]


def _pp_body(env, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    hidden, seq, mbs, num_mb, num_layers = 8, 6, 2, 4, 4
    weights = _stack_weights(hidden, num_layers)
    data = _mb_data(num_mb, seq, mbs, hidden)

    # unsplit reference: mean of per-microbatch losses, like the schedule
    ref = _Stack(None, weights, 0, num_layers, True)
    ref_losses = []
    for mb in data:
        loss = F.mse_loss(ref(mb["x"]), mb["y"])
        ref_losses.append(loss.detach())
        if not forward_only:
            (loss / num_mb).backward()

    cfg = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=1,
        pipeline_model_parallel_size=env.pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    per = num_layers // env.pp
    first = env.pp_rank * per
    model = _Stack(cfg, weights, first, first + per, env.is_first_stage)

    def loss_func(y, out):
        loss = F.mse_loss(out, y)
        return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

    def forward_step(it, m):
        mb = next(it)
        return m(mb["x"]), partial(loss_func, mb["y"])

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(data),
        model=[model],
        num_microbatches=num_mb,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    out = {}
    if env.is_last_stage:
        out["loss"] = max(rel_err(a["loss"], b) for a, b in zip(losses, ref_losses))
    if not forward_only:
        for i, lin in enumerate(model.layers):
            rl = ref.layers[first + i]
            out[f"dw{first + i}"] = rel_err(lin.weight.grad, rl.weight.grad)
            out[f"db{first + i}"] = rel_err(lin.bias.grad, rl.bias.grad)
    return out


@pytest.mark.parametrize("forward_only", [False, True])
def test_pp2_1f1b_schedule_matches_unsplit_model(forward_only):
    results = run_distributed(_pp_body, 2, forward_only, pp=2)
    assert "loss" in results[1]
    if not forward_only:
        assert {"dw0", "dw1"} <= set(results[0]) and {"dw2", "dw3"} <= set(results[1])
    for errs in results:
        assert all(v < RTOL for v in errs.values()), errs


def _ddp_body(env, steps):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import MegatronModule, TransformerConfig

    torch.manual_seed(3)
    w = [(torch.randn(16, 8) * 0.3, torch.randn(16)), (torch.randn(4, 16) * 0.3, torch.randn(4))]
    data = [(torch.randn(2 * env.dp, 8), torch.randn(2 * env.dp, 4)) for _ in range(steps)]
    lr, betas, eps = 1e-2, (0.9, 0.999), 1e-8

    def make_mlp():
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        with torch.no_grad():
            m[0].weight.copy_(w[0][0]), m[0].bias.copy_(w[0][1]), m[2].weight.copy_(w[1][0]), m[2].bias.copy_(w[1][1])
        return m

    ref = make_mlp()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    for x, y in data:
        ref_opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)

    class Wrapped(MegatronModule):
        def __init__(self):
            super().__init__(cfg)
            self.net = make_mlp()

        def forward(self, x):
            return self.net(x)

    ddp = DistributedDataParallel(
        config=cfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        module=Wrapped(),
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            adam_beta1=betas[0],
            adam_beta2=betas[1],
            adam_eps=eps,
            weight_decay=0.0,
            use_distributed_optimizer=True,
            clip_grad=0.0,
            bf16=False,
            params_dtype=torch.float32,
        ),
        [ddp],
    )
    lo, hi = 2 * env.dp_rank, 2 * env.dp_rank + 2
    for x, y in data:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        F.mse_loss(ddp(x[lo:hi]), y[lo:hi]).backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
    got = dict(ddp.module.net.named_parameters())
    return {name: rel_err(got[name].detach(), p.detach()) for name, p in ref.named_parameters()}


def test_dp2_ddp_distributed_optimizer_matches_adamw():
    for errs in run_distributed(_ddp_body, 2, 3):
        assert max(errs.values()) < RTOL, errs
