"""RL stage: rollouts, rewards, advantages (GRPO, BoPO, PPO), the clipped loss and the trainer."""
