"""Prompts: built-in tasks, prompt files, chat templates, and the reward rules that score responses."""
