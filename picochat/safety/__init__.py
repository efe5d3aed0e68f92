"""Safety SFT data workflow: red-team questions, prompt optimization, blue-team answers, judge filter,
data-quality report and safety eval of a trained model. See docs/safety.md; CLI in picochat.safety.cli.
"""
