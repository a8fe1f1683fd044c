"""Optimizer CPU offload backends: DeepSpeed's compiled CPU AdamW behind megatron-core's hybrid optimizer.

megatron-core's HybridDeviceOptimizer moves the distributed optimizer's shard to
the host and runs a host AdamW there: torch's fused AdamW ('megatron') or
DeepSpeedCPUAdam ('deepspeed', built with this machine's compiler). The hybrid
optimizer itself only engages for CUDA parameters, so on CPU the tests pin down
what is ours: the DeepSpeed adapter computes torch AdamW's update from the
arguments megatron passes, and the backend switch is scoped. (Timings:
scripts/bench_offload.py.)
"""
from __future__ import annotations

import pytest
import torch

from megatron_senseflow.config import ConfigError, load_config
from megatron_senseflow.roles import _DeepSpeedCPUAdam, cpu_adam_backend


def _megatron_args(lr=3e-4):
    # exactly what megatron-core 0.16 passes to its CPU optimizer class (optimizer/__init__.py)
    return dict(lr=lr, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8, bias_correction=True, fused=True)


@pytest.mark.slow  # the first use compiles DeepSpeed's cpu_adam op (~1 min on 2 cores)
def test_deepspeed_cpu_adam_matches_torch_adamw_under_megatrons_arguments():
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `make setup` (pip --no-build-isolation)")
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(1000, generator=g), torch.randn(37, 5, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(5)]
    results = []
    for cls in (torch.optim.AdamW, _DeepSpeedCPUAdam.get()):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        args = _megatron_args()
        if cls is torch.optim.AdamW:
            args.pop("bias_correction")
        opt = cls(params, **args)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=2e-6, rtol=1e-5), (a - b).abs().max()
    assert not torch.equal(results[0][0], init[0])  # the steps moved the weights


def test_backend_switch_is_scoped():
    import megatron.core.optimizer as mopt

    before = mopt.CPUAdam
    with cpu_adam_backend("megatron"):
        assert mopt.CPUAdam is before  # megatron's own: torch AdamW
    if pytest.importorskip("deepspeed", reason="DeepSpeed is installed by `make setup`"):
        with cpu_adam_backend("deepspeed"):
            assert mopt.CPUAdam is _DeepSpeedCPUAdam.get()
    assert mopt.CPUAdam is before


def test_offload_settings_fail_in_one_sentence():
    with pytest.raises(ConfigError, match=r"cpu_offload=megatron needs parallel.distributed_optimizer=true"):
        load_config("tiny", ["roles.generator.optimizer.cpu_offload=megatron", "parallel.distributed_optimizer=false"])
    with pytest.raises(ConfigError, match=r"cpu_offload='nvme' is not one of 'none', 'megatron', 'deepspeed'"):
        load_config("tiny", ["roles.fake_score.optimizer.cpu_offload=nvme"])
