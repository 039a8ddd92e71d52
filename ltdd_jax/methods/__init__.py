"""What makes a set: the method registry, experts, distillation, selection and the grouping plugins."""
