"""The reference networks of the op coverage (squeeze-excite, SiLU, split, upsampling, transposed conv, max
pooling): each quantized by QFT on two shipped profiles, whose evaluation mode, the simulator and the
TVM-compiled model give the same integers on MNIST images and on any input batch hypothesis draws."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from qftsim.qft import quantize_graph
from qftsim.zoo import REFERENCE_NETWORKS
from tests.test_qft import _simulate, mnist  # noqa: F401 (mnist is a fixture)

# network: (two profiles, ops its IntModel must hold)
CASES = {
    "mobilenetv3": (("litert-xnnpack", "litert-reference"), {"mul", "lut", "conv2d", "avgpool2d"}),
    "efficientnet": (("int8-default", "litert-xnnpack"), {"mul", "lut", "mean"}),
    "yolo": (("litert-optimized", "int8-default"), {"slice", "resize", "concat", "maxpool2d", "lut"}),
    "unet": (("litert-xnnpack", "fpga-w4a4-pow2-acc16"), {"zero_insert", "resize", "concat", "mean"}),
    "resnet-maxpool": (("npu-a8w4", "litert-xnnpack"), {"maxpool2d", "add"}),
}


@pytest.mark.parametrize("name", CASES)
def test_reference_network_eval_simulator_and_compiled_agree(name, mnist):
    import tvm
    from tvm import relax

    from export.build import compile_module
    from export.lower import lower_into

    profiles, ops = CASES[name]
    torch.manual_seed(0)
    net = REFERENCE_NETWORKS[name]().eval()  # untrained: exactness does not depend on the weights' values
    x_train, _, x_test, _ = mnist
    bb, cases = relax.BlockBuilder(), []
    for i, profile in enumerate(profiles):
        qgraph, _ = quantize_graph(net, x_train[:128], profile, epochs=1, dataset_size=128, progress=False)
        int_model = qgraph.integerize()
        assert ops <= {n.op for n in int_model.nodes}, (profile, [n.op for n in int_model.nodes])
        lower_into(bb, int_model, f"m{i}")
        cases.append((qgraph, int_model))
    vm = relax.VirtualMachine(compile_module(bb.get(), "host"), tvm.cpu())

    def agree(real: torch.Tensor) -> None:
        for i, (qgraph, int_model) in enumerate(cases):
            with torch.no_grad():
                ints = qgraph.run_integers(real)[qgraph.fg.output].numpy().astype(np.int64)
            q = int_model.inputs[0].quant.quantize(real.numpy())
            assert np.array_equal(_simulate(int_model, q).astype(np.int64), ints), int_model.profile.name
            assert np.array_equal(vm[f"m{i}"](tvm.runtime.tensor(q)).numpy().astype(np.int64), ints)

    agree(x_test[:64])

    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batch=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([0.3, 1.0, 5.0]))
    def on_any_batch(batch, seed, spread):
        generator = torch.Generator().manual_seed(seed)
        agree(torch.randn(batch, 1, 28, 28, generator=generator) * spread)

    on_any_batch()
