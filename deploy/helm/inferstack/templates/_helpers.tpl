{{/* Names, labels and value checks shared by every template. */}}

{{- define "inferstack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inferstack.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The server Deployment and its Services. */}}
{{- define "inferstack.server.fullname" -}}
{{- include "inferstack.fullname" . | trunc 56 | trimSuffix "-" }}
{{- end }}

{{- define "inferstack.server.headless" -}}
{{- printf "%s-headless" (include "inferstack.server.fullname" .) }}
{{- end }}

{{- define "inferstack.gateway.fullname" -}}
{{- printf "%s-gateway" (include "inferstack.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "inferstack.worker.fullname" -}}
{{- printf "%s-worker" (include "inferstack.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "inferstack.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inferstack.labels" -}}
helm.sh/chart: {{ include "inferstack.chart" . }}
app.kubernetes.io/name: {{ include "inferstack.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: component is server, gateway or worker. Usage: include "inferstack.selectorLabels" (list . "server") */}}
{{- define "inferstack.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "inferstack.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "inferstack.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inferstack.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "inferstack.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- $tag := default $root.Chart.AppVersion $image.tag -}}
{{- if $image.digest -}}
{{ printf "%s@%s" $image.repository $image.digest }}
{{- else -}}
{{ printf "%s:%s" $image.repository $tag }}
{{- end -}}
{{- end }}

{{/* Seconds a server pod needs to stop cleanly: the preStop pause (endpoints removal propagates), the HTTP/gRPC
     drain (bounded by --exit-timeout-secs), the models' drain and unload (bounded by it again), and a margin. */}}
{{- define "inferstack.server.terminationGracePeriod" -}}
{{- $s := .Values.server -}}
{{- add (int $s.lifecycle.preStopSleepSeconds) (mul 2 (int $s.exitTimeoutSeconds)) (int $s.lifecycle.terminationMarginSeconds) -}}
{{- end }}

{{/* The model repository volume the server mounts read-only at server.modelRepository.mountPath. */}}
{{- define "inferstack.modelRepository.assembled" -}}
{{- $repo := .Values.server.modelRepository -}}
{{- if or (eq $repo.source "objectStorage") (and (eq $repo.source "pvc") .Values.modelConfigs) -}}true{{- end -}}
{{- end }}

{{/*
Every wrong-values check in one place, with messages that name the keys to change.
Rendered by every template through "inferstack.validate" so `helm template` and `helm install` fail early.
*/}}
{{- define "inferstack.validate" -}}
{{- $v := .Values -}}
{{- $hpa := $v.autoscaling.hpa -}}
{{- $keda := $v.autoscaling.keda -}}
{{- if and $hpa.enabled $keda.enabled -}}
{{- fail (printf "autoscaling.hpa.enabled and autoscaling.keda.enabled are both true: both would scale Deployment %s (KEDA creates its own HPA and the two fight over the replica count). Enable only one." (include "inferstack.server.fullname" .)) -}}
{{- end -}}
{{- if $hpa.enabled -}}
{{- if gt (int $hpa.minReplicas) (int $hpa.maxReplicas) -}}
{{- fail (printf "autoscaling.hpa.minReplicas (%d) is greater than autoscaling.hpa.maxReplicas (%d)." (int $hpa.minReplicas) (int $hpa.maxReplicas)) -}}
{{- end -}}
{{- if lt (int $hpa.minReplicas) 1 -}}
{{- fail (printf "autoscaling.hpa.minReplicas must be at least 1 (got %d); use KEDA to scale to zero." (int $hpa.minReplicas)) -}}
{{- end -}}
{{- if not (or $hpa.cpu.enabled $hpa.pendingRequests.enabled $hpa.requestRate.enabled $hpa.extraMetrics) -}}
{{- fail "autoscaling.hpa.enabled is true but no metric is enabled: enable autoscaling.hpa.cpu, .pendingRequests or .requestRate, or list autoscaling.hpa.extraMetrics." -}}
{{- end -}}
{{- if and $hpa.cpu.enabled (not (and $v.server.resources.requests $v.server.resources.requests.cpu)) -}}
{{- fail "autoscaling.hpa.cpu.enabled needs server.resources.requests.cpu: CPU utilization is measured against the request." -}}
{{- end -}}
{{- end -}}
{{- if $keda.enabled -}}
{{- if gt (int $keda.minReplicas) (int $keda.maxReplicas) -}}
{{- fail (printf "autoscaling.keda.minReplicas (%d) is greater than autoscaling.keda.maxReplicas (%d)." (int $keda.minReplicas) (int $keda.maxReplicas)) -}}
{{- end -}}
{{- if not $keda.prometheus.serverAddress -}}
{{- fail "autoscaling.keda.enabled needs autoscaling.keda.prometheus.serverAddress (the Prometheus that scrapes the servers, e.g. http://prometheus-operated.monitoring:9090)." -}}
{{- end -}}
{{- end -}}
{{- $repo := $v.server.modelRepository -}}
{{- if not (has $repo.source (list "pvc" "objectStorage" "image")) -}}
{{- fail (printf "server.modelRepository.source must be pvc, objectStorage or image (got %q)." $repo.source) -}}
{{- end -}}
{{- if and (eq $repo.source "pvc") (not $repo.pvc.claimName) -}}
{{- fail "server.modelRepository.source is pvc but server.modelRepository.pvc.claimName is empty: name the PersistentVolumeClaim that holds the model repository." -}}
{{- end -}}
{{- if and (eq $repo.source "objectStorage") (not $repo.objectStorage.uri) -}}
{{- fail "server.modelRepository.source is objectStorage but server.modelRepository.objectStorage.uri is empty (e.g. s3://bucket/models)." -}}
{{- end -}}
{{- if and $v.modelConfigs (eq $repo.source "image") -}}
{{- fail "modelConfigs needs server.modelRepository.source pvc or objectStorage (the image's repository is used as it is)." -}}
{{- end -}}
{{- if and $v.server.gpu.enabled (lt (int $v.server.gpu.count) 1) -}}
{{- fail (printf "server.gpu.count must be at least 1 when server.gpu.enabled (got %d)." (int $v.server.gpu.count)) -}}
{{- end -}}
{{- range $name, $pdb := dict "server" $v.server.podDisruptionBudget "gateway" $v.gateway.podDisruptionBudget -}}
{{- if and $pdb.enabled (and (ne (toString $pdb.minAvailable) "<nil>") (ne (toString $pdb.maxUnavailable) "<nil>")) -}}
{{- fail (printf "%s.podDisruptionBudget: set minAvailable or maxUnavailable, not both." $name) -}}
{{- end -}}
{{- end -}}
{{- if and $v.worker.keda.enabled (not $v.worker.enabled) -}}
{{- fail "worker.keda.enabled needs worker.enabled: there is no worker Deployment to scale." -}}
{{- end -}}
{{- if and $v.worker.enabled (not $v.worker.redisUrl) -}}
{{- fail "worker.enabled needs worker.redisUrl (redis://host:6379/0): workers consume jobs from Redis Streams." -}}
{{- end -}}
{{- if and $v.worker.keda.enabled (gt (int $v.worker.keda.minReplicas) (int $v.worker.keda.maxReplicas)) -}}
{{- fail (printf "worker.keda.minReplicas (%d) is greater than worker.keda.maxReplicas (%d)." (int $v.worker.keda.minReplicas) (int $v.worker.keda.maxReplicas)) -}}
{{- end -}}
{{- if and $v.ingress.enabled $v.ingress.grpc.enabled (not $v.ingress.grpc.host) -}}
{{- fail "ingress.grpc.enabled needs ingress.grpc.host: gRPC is routed by host name (its paths are /package.Service/Method)." -}}
{{- end -}}
{{- end }}
