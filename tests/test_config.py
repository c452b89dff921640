import pytest

from jaxmem import RunConfig, load_config_file
from jaxmem.errors import JaxmemError


@pytest.mark.parametrize("changes,needle", [
    (dict(num_models=1), "num_models must be an integer >= 2, got 1"),
    (dict(subset_ratios=(1.2,)), "subset ratio must be in (0, 1), got 1.2"),
    (dict(subset_ratios=(0.0,)), "got 0.0"),
    (dict(epochs=0), "epochs must be a positive integer, got 0"),
    (dict(batch_size=-3), "batch_size must be a positive integer, got -3"),
    (dict(model="resnet9000"), "unknown model 'resnet9000'; choose one of: cnn, mlp"),
    (dict(mask_design="weird"), "unknown mask design 'weird'"),
    (dict(strategy="fast"), "unknown strategy 'fast'"),
    (dict(optimizer="lion"), "unknown optimizer 'lion'"),
    (dict(compute_dtype="float16"), "unknown compute_dtype 'float16'; choose one of: float32, bfloat16"),
    (dict(label_noise=1.0), "label_noise must be in [0, 1), got 1.0"),
    (dict(mask_design="balanced", subset_ratios=(0.7,)), "subset ratio must be 0.5"),
    (dict(mask_design="balanced", subset_ratios=(0.5,), num_models=5), "even num_models, got 5"),
])
def test_bad_configs_give_one_line_errors(changes, needle):
  with pytest.raises(JaxmemError) as info:
    RunConfig(**changes).validate()
  assert needle in str(info.value) and "\n" not in str(info.value)


def test_identity_excludes_execution_fields():
  a, b = RunConfig(strategy="vmap"), RunConfig(strategy="map", data_dir="/x")
  assert a.identity() == b.identity()
  assert RunConfig(seed=1).identity() != RunConfig(seed=2).identity()


def test_config_files_python_and_json(tmp_path):
  py = tmp_path / "c.py"
  py.write_text("from jaxmem import RunConfig\ndef get_config():\n  return RunConfig(num_models=6, epochs=2)\n")
  assert load_config_file(py).num_models == 6
  js = tmp_path / "c.json"
  js.write_text('{"num_models": 4, "subset_ratios": [0.5]}')
  assert load_config_file(js) == RunConfig(num_models=4, subset_ratios=(0.5,))
  js.write_text('{"num_modls": 4}')
  with pytest.raises(JaxmemError, match="unknown config field"):
    load_config_file(js)
