"""OULAD (Kuzilek et al. 2017): the Open University Learning Analytics Dataset."""
