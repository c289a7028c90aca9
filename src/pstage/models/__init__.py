"""Models: timm backbone + heads, losses, the LightningModule, checkpoint loading."""
