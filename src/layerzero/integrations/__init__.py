"""Framework integrations, each imported on demand (none is imported by `import layerzero`).

- `layerzero.integrations.torch_ops`: the `torch.ops.layerzero.*` custom ops that torch.compile and
  torch.export see in place of the `lz.*` calls (imported on the first trace).
- `layerzero.integrations.transformers`: the "layerzero" attention implementation of Hugging Face
  transformers and `patch(model)` / `unpatch(model)` for norms, RoPE and gated MLPs.
- `layerzero.integrations.diffusers`: an attention processor for diffusers UNet and DiT models.
"""
