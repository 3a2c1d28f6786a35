"""Plain nn.Modules: the GPT decoder and its Mixture-of-Experts parts. No torch.distributed here."""
