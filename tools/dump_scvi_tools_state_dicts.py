"""Dump scvi-tools 1.5.1 module state-dict keys, shapes and signatures to tests/data/scvi_tools_state_dicts.json.

Run from the repository root where scvi-tools 1.5.1 is installed (not a dependency of scvi-cli):
    python tools/dump_scvi_tools_state_dicts.py
"""

import inspect, json
import numpy as np
import torch
from scvi.module import VAE, LDVAE, VAEC

torch.manual_seed(0)
configs = {
    "vae_default": (VAE, {}),
    "vae_batch": (VAE, {"n_batch": 3}),
    "vae_latent_library": (VAE, {"n_batch": 3, "use_observed_lib_size": False,
                                 "library_log_means": "np.zeros((1,3))", "library_log_vars": "np.ones((1,3))"}),
    "vae_gene_batch": (VAE, {"dispersion": "gene-batch", "n_batch": 3}),
    "vae_gene_label": (VAE, {"dispersion": "gene-label", "n_labels": 4}),
    "vae_gene_cell": (VAE, {"dispersion": "gene-cell"}),
    "vae_two_layers_covariates": (VAE, {"n_layers": 2, "n_batch": 2, "n_continuous_cov": 2,
                                        "n_cats_per_cov": [3, 4], "dispersion": "gene-batch"}),
    "vae_layer_norm": (VAE, {"use_batch_norm": "none", "use_layer_norm": "both", "n_batch": 2}),
    "vae_encode_covariates": (VAE, {"encode_covariates": True, "n_batch": 2, "n_cats_per_cov": [3]}),
    "ldvae_default": (LDVAE, {"library_log_means": "np.zeros((1,1))", "library_log_vars": "np.ones((1,1))"}),
    "ldvae_batch": (LDVAE, {"n_batch": 3, "library_log_means": "np.zeros((1,3))", "library_log_vars": "np.ones((1,3))"}),
    "vaec_default": (VAEC, {"n_labels": 4}),
    "vaec_batch": (VAEC, {"n_labels": 4, "n_batch": 3}),
}
def realize(kw):
    out = {}
    for k, v in kw.items():
        out[k] = eval(v) if isinstance(v, str) and v.startswith("np.") else v
    return out

result = {}
for name, (cls, kw) in configs.items():
    mod = cls(n_input=50, **realize(kw))
    sd = mod.state_dict()
    result[name] = {
        "module": f"scvi.module.{cls.__name__}",
        "kwargs": {"n_input": 50, **kw},
        "state_dict": {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()},
    }
sigs = {}
for cls in (VAE, LDVAE, VAEC):
    sig = inspect.signature(cls.__init__)
    sigs[f"scvi.module.{cls.__name__}"] = {
        p.name: (None if p.default is inspect.Parameter.empty else repr(p.default))
        for p in sig.parameters.values() if p.name != "self"
    } | {"__str__": str(sig)}
out = {"_meta": {"scvi_tools_version": __import__("scvi").__version__, "torch_version": torch.__version__,
                 "note": "LDVAE defaults to use_observed_lib_size=False, so library_log_means/vars are required by its constructor (shape (1, max(n_batch,1))). state_dict entries are [shape, dtype]; kwargs strings starting with 'np.' are numpy expressions; signature values are repr of defaults (null = required)"},
       "signatures": sigs, **result}
with open("tests/data/scvi_tools_state_dicts.json", "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
print(json.dumps(sigs, indent=1))
