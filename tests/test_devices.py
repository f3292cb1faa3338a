"""No tensor is made on the default device: with torch's default device set to "meta" and model and
data on the CPU, every factory call that forgets its device= makes a meta tensor, and the first
operation that mixes it with a CPU tensor fails. On a GPU the same call would make a CPU tensor
beside CUDA ones (issue 30). Covered: one training step, the post-training samplers (and 2x
longer), the energy, each method's extra (CDRL inpainting, DCD denoising, DA-EBM's MGMS and
annealed samplers and its long-run check) and the evaluator's phases (FID features of samples,
OOD energies, the 2D grid density, the EMA update and the epoch loader)."""
from types import SimpleNamespace

import pytest
import torch
from conftest import METHODS, one_training_step, tiny_args

import common
import eval_fid_ood


def tiny_model(method, kind, image_folder):
    overrides = dict(image_size=8, image_channels=3) if kind == "image" else {}
    args = tiny_args(method, "unused", image_folder if kind == "image" else None, **overrides)
    return args, METHODS[method].build_model(args)


@pytest.mark.parametrize("kind", ["2d", "image"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_phase_runs_with_the_default_device_elsewhere(method, kind, image_folder,
                                                            tmp_path):
    module = METHODS[method]
    args, model = tiny_model(method, kind, image_folder)
    ema = tiny_model(method, kind, image_folder)[1]
    shape = module.sample_shape(args)
    torch.manual_seed(0)
    x0 = torch.rand((8,) + shape) * 2 - 1
    chains = ((torch.rand((16,) + shape), torch.randint(0, args.num_levels + 1, (16,)))
              if method == "daebm" else None)
    loader = common.EpochLoader(torch.arange(40), 8, seed=1)
    if method == "dcd" and kind == "image":
        denoise_args = tiny_args(method, "unused", image_folder, image_size=8, image_channels=3,
                                 task="denoise", num_levels=None, denoise_steps=4)
        one_level = module.build_model(denoise_args)
        heldout = (torch.rand((4,) + shape) * 255).to(torch.uint8)
    torch.set_default_device("meta")
    try:
        assert loader.next().device.type == "cpu"
        one_training_step(method, model.train(), x0, args, chains)
        common.update_ema(ema, model, 0.9, copy_buffers=True)
        for multiplier in (1, 2):
            samples = module.sample(model, 3, args, "cpu", step_multiplier=multiplier)
            assert samples.device.type == "cpu" and samples.shape == (3,) + shape
        assert module.energy(model, samples, args).device.type == "cpu"
        if method == "cdrl" and kind == "image":
            known = torch.rand_like(samples) < 0.5
            assert module.inpaint(model, samples, known, args, "cpu").shape == samples.shape
        if method == "dcd" and kind == "image":
            scores, _ = module.denoise_heldout(one_level, heldout, denoise_args, "cpu")
            assert scores["psnr_noisy"] > 0 and 0 <= scores["denoise_accept"] <= 1
        if method == "daebm":
            kept, _ = module.generate(model, 2, args, "cpu", max_transitions=3, n_chains=4)
            assert kept.device.type == "cpu"
            assert module.annealed_generate(model, 2, args, "cpu").device.type == "cpu"
            records, _ = module.long_run(model, x0[:2], 3, [1, 3])
            assert [r["mala_steps"] for r in records] == [1, 3]
        if kind == "image":
            ea = SimpleNamespace(batch_size=2, seed=5)
            def network(batch):
                return [batch.float().flatten(1)[:, :4]]
            reference = common.feature_statistics(torch.randn(20, 4, device="cpu") * 50 + 128)
            fid, energy, first = eval_fid_ood.fid_of_samples(module, model, args, ea, network,
                                                             reference, 4, "cpu", 1, "FID")
            assert fid > 0 and first.device.type == "cpu"
            ea = eval_fid_ood.EvalArgs(ckpt="unused", device="cpu", batch_size=2, n_ood=6,
                                       ood=eval_fid_ood.SYNTHETIC_OOD, inpaint="center",
                                       n_inpaint=4)
            results = {}
            eval_fid_ood.evaluate_ood(module, model, args, ea, "unused", "cpu", results,
                                      lambda: None)
            assert set(results["ood"]) == set(eval_fid_ood.SYNTHETIC_OOD)
            if method == "cdrl":
                eval_fid_ood.evaluate_inpainting(module, model, args, ea, "unused", "cpu",
                                                 results, str(tmp_path))
                assert results["inpaint"]["n"] == 4
        else:
            log_p = eval_fid_ood.grid_log_density(lambda x: module.energy(model, x, args), -2, 2,
                                                  20)
            assert log_p.shape == (20, 20) and torch.isfinite(log_p).all()
    finally:
        torch.set_default_device("cpu")
