"""mnist-serve's flags reach the runtime options; bad values are one-line usage errors."""

import pytest

from serving.server import parse_args


def test_runtime_flags_reach_runtime_options():
    config = parse_args(
        ["--device", "cpu", "--intra-op-threads", "2", "--inter-op-threads", "2", "--execution-mode",
         "parallel", "--spinning", "--no-io-binding", "--cuda-graph-batch-sizes", "64,1,8",
         "--cudnn-conv-algo-search", "EXHAUSTIVE"]
    )  # fmt: skip
    runtime = config.runtime
    assert (runtime.device, runtime.intra_op_threads, runtime.inter_op_threads) == ("cpu", 2, 2)
    assert runtime.execution_mode == "parallel" and runtime.allow_spinning and not runtime.io_binding
    assert runtime.cuda_graph_batch_sizes == (1, 8, 64)
    assert runtime.cudnn_conv_algo_search == "EXHAUSTIVE"


def test_defaults_are_the_measured_cpu_settings():
    runtime = parse_args([]).runtime
    assert (runtime.intra_op_threads, runtime.inter_op_threads, runtime.allow_spinning) == (1, 1, False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cuda-graph-batch-sizes", "1,x"], "comma-separated integers"),
        (["--cuda-graph-batch-sizes", "0,8"], "must be positive"),
        (["--intra-op-threads", "-1"], "thread counts"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
