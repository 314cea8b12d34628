"""What fine-tuning costs, and how it leaves one machine: memory, time, and several devices."""
