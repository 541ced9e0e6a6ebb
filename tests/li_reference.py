"""A direct transcription of Li et al.'s scoring loop (diffusion-classifier, eval_prob_adaptive.py,
eval_error; MIT licence), n_trials = 1, CPU, float32: the parity reference for our classifier."""
import torch
import torch.nn.functional as F


def eval_prob_adaptive(unet, latent, text_embeds, scheduler, n_samples, to_keep, all_noise, loss="l2", batch_size=32):
    T = scheduler.config.num_train_timesteps
    max_n_samples = max(n_samples)
    data = dict()
    t_evaluated = set()
    remaining_prmpt_idxs = list(range(len(text_embeds)))
    start = T // max_n_samples // 2
    t_to_eval = list(range(start, T, T // max_n_samples))[:max_n_samples]
    stages = []
    for n_samp, n_to_keep in zip(n_samples, to_keep):
        ts, noise_idxs, text_embed_idxs = [], [], []
        curr_t_to_eval = t_to_eval[len(t_to_eval) // n_samp // 2::len(t_to_eval) // n_samp][:n_samp]
        curr_t_to_eval = [t for t in curr_t_to_eval if t not in t_evaluated]
        for prompt_i in remaining_prmpt_idxs:
            for t_idx, t in enumerate(curr_t_to_eval, start=len(t_evaluated)):
                ts.extend([t])
                noise_idxs.extend([t_idx])
                text_embed_idxs.extend([prompt_i])
        t_evaluated.update(curr_t_to_eval)
        pred_errors = eval_error(unet, scheduler, latent, all_noise, ts, noise_idxs, text_embeds, text_embed_idxs,
                                 batch_size, loss)
        for prompt_i in remaining_prmpt_idxs:
            mask = torch.tensor(text_embed_idxs) == prompt_i
            prompt_ts = torch.tensor(ts)[mask]
            prompt_pred_errors = pred_errors[mask]
            if prompt_i not in data:
                data[prompt_i] = dict(t=prompt_ts, pred_errors=prompt_pred_errors)
            else:
                data[prompt_i]["t"] = torch.cat([data[prompt_i]["t"], prompt_ts])
                data[prompt_i]["pred_errors"] = torch.cat([data[prompt_i]["pred_errors"], prompt_pred_errors])
        errors = [-data[prompt_i]["pred_errors"].mean() for prompt_i in remaining_prmpt_idxs]
        best_idxs = torch.topk(torch.tensor(errors), k=n_to_keep, dim=0).indices.tolist()
        remaining_prmpt_idxs = [remaining_prmpt_idxs[i] for i in best_idxs]
        stages.append(list(remaining_prmpt_idxs))
    assert len(remaining_prmpt_idxs) == 1
    return remaining_prmpt_idxs[0], data, stages


def eval_error(unet, scheduler, latent, all_noise, ts, noise_idxs, text_embeds, text_embed_idxs, batch_size=32,
               loss="l2"):
    assert len(ts) == len(noise_idxs) == len(text_embed_idxs)
    pred_errors = torch.zeros(len(ts))
    idx = 0
    with torch.inference_mode():
        for _ in range(len(ts) // batch_size + int(len(ts) % batch_size != 0)):
            batch_ts = torch.tensor(ts[idx: idx + batch_size])
            noise = all_noise[noise_idxs[idx: idx + batch_size]]
            noised_latent = latent * (scheduler.alphas_cumprod[batch_ts] ** 0.5).view(-1, 1, 1, 1) + \
                noise * ((1 - scheduler.alphas_cumprod[batch_ts]) ** 0.5).view(-1, 1, 1, 1)
            text_input = text_embeds[text_embed_idxs[idx: idx + batch_size]]
            noise_pred = unet(noised_latent, batch_ts, encoder_hidden_states=text_input).sample
            if loss == "l2":
                error = F.mse_loss(noise, noise_pred, reduction="none").mean(dim=(1, 2, 3))
            elif loss == "l1":
                error = F.l1_loss(noise, noise_pred, reduction="none").mean(dim=(1, 2, 3))
            else:
                raise NotImplementedError
            pred_errors[idx: idx + len(batch_ts)] = error.detach().cpu()
            idx += len(batch_ts)
    return pred_errors
