from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("whoami", views.whoami),
    path("orders", views.orders),
]
