"""How tests/golden/hdit/ was made from ../shared/reference/hdit/ (run once; not a test)."""
# Re-save the official reference files into tests/golden/hdit/ (smaller: only the tensors the tests use).
import gzip, io, torch, os, glob
def _clone(o):
    if torch.is_tensor(o): return o.clone()
    if isinstance(o, dict): return {k: _clone(v) for k, v in o.items()}
    return o
SRC = '/work/shared/reference/hdit/'
DST = '/work/main/tests/golden/hdit/'
def save(obj, name):
    obj = _clone(obj)
    buf = io.BytesIO(); torch.save(obj, buf)
    with gzip.open(DST + name + '.pt.gz', 'wb', compresslevel=9) as f: f.write(buf.getvalue())
def load(name): return torch.load(SRC + 'golden/' + name + '.pt', weights_only=False)
def slim(d, outputs, inputs=None, batch=None):
    o = {k: d['outputs'][k] for k in outputs}
    i = {k: v for k, v in d['inputs'].items() if inputs is None or k in inputs}
    if batch is not None:
        i = {k: (v[:batch] if torch.is_tensor(v) and v.dim() and k != 'sigmas' and k != 'sde_noises' else v) for k, v in i.items()}
        if 'sde_noises' in i: i['sde_noises'] = i['sde_noises'][:, :batch]
        o = {k: (v[:batch] if k not in ('sigmas_karras',) else v) for k, v in o.items()}
    cfg = {k: v for k, v in d['config'].items()} if isinstance(d['config'], dict) else d['config']
    return {'config': cfg, 'state_dict': d['state_dict'], 'inputs': i, 'outputs': o,
            'fp32_vs_fp64_max_abs_diff': d.get('fp32_vs_fp64_max_abs_diff')}
fw = ['model_out', 'c_skip', 'c_out', 'c_in', 'denoiser_out', 'weight_soft_min_snr', 'loss_soft_min_snr',
      'weight_karras', 'loss_karras', 'weight_snr', 'loss_snr', 'loss_config_weighting', 'inter.mapping']
d = load('tiny_na_forward'); s = slim(d, fw + ['inter.down_levels.0.0.self_attn', 'inter.mid_level'])
s['outputs']['model_out_aug_cond_none_0'] = d['outputs']['model_out_aug_cond_none'][:1]
save(s, 'tiny_na_forward')
d = load('tiny_swin_forward'); save(slim(d, fw + ['inter.down_levels.0.0.self_attn', 'inter.up_levels.0.0.self_attn']), 'tiny_swin_forward')
d = load('tiny_noattn_mapcond_forward'); save(slim(d, fw + ['model_out_aug_cond_none', 'inter.splits.0']), 'tiny_noattn_mapcond_forward')
d = load('tiny_na_sampling'); save(slim(d, ['sample_dpmpp_2m', 'sample_euler', 'sample_dpmpp_2m_sde_heun_eta0', 'sample_dpmpp_2m_cfg2', 'sample_dpmpp_3m_sde_eta1', 'sigmas_karras'], batch=1), 'tiny_na_sampling')
for name in ['rope', 'components', 'sigma_sampler', 'natten_reference']:
    d = load(name); save({k: d[k] for k in ('config', 'state_dict', 'inputs', 'outputs')}, name)
# keys and official param groups: text, one gzip of a dict {config: text}
txt = {os.path.basename(p)[:-4]: open(p).read() for p in sorted(glob.glob(SRC + 'keys/*.txt'))}
pg = {os.path.basename(p)[:-4]: open(p).read() for p in sorted(glob.glob(SRC + 'param_groups/*.txt'))}
save({'keys': txt, 'param_groups': pg}, 'keys_and_param_groups')
