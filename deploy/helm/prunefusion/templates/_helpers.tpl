{{/* Names. */}}
{{- define "prunefusion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "prunefusion.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "prunefusion.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "prunefusion.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "prunefusion.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-home" (include "prunefusion.fullname" .)) -}}
{{- end -}}

{{- define "prunefusion.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Labels: call with (dict "ctx" $ "component" "server"). */}}
{{- define "prunefusion.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prunefusion.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "prunefusion.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "prunefusion.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: prunefusion
{{- end -}}

{{/* The server's ports, read from the config (the server's defaults when a key is absent; null: off). */}}
{{- define "prunefusion.server" -}}
{{- toJson (.Values.config.server | default dict) -}}
{{- end -}}

{{- define "prunefusion.grpcPort" -}}
{{- $s := include "prunefusion.server" . | fromJson -}}
{{- dig "port" 50051 $s | int -}}
{{- end -}}

{{- define "prunefusion.metricsPort" -}}
{{- $s := include "prunefusion.server" . | fromJson -}}
{{- $p := dig "metrics_port" 9464 $s -}}
{{- if not (kindIs "invalid" $p) -}}{{ $p | int }}{{- end -}}
{{- end -}}

{{- define "prunefusion.httpPort" -}}
{{- $s := include "prunefusion.server" . | fromJson -}}
{{- $p := dig "http_port" 8000 $s -}}
{{- if not (kindIs "invalid" $p) -}}{{ $p | int }}{{- end -}}
{{- end -}}

{{- define "prunefusion.healthPort" -}}
{{- $s := include "prunefusion.server" . | fromJson -}}
{{- $p := dig "health_port" nil $s -}}
{{- if not (kindIs "invalid" $p) -}}{{ $p | int }}{{- end -}}
{{- end -}}

{{/* The port the readiness and startup probes ask for grpc.health.v1 status: the serving port, or with TLS on
it (the kubelet's gRPC probe speaks plaintext only) the plaintext health port. */}}
{{- define "prunefusion.readinessPort" -}}
{{- $s := include "prunefusion.server" . | fromJson -}}
{{- if dig "tls" nil $s -}}
{{- $health := include "prunefusion.healthPort" . -}}
{{- if not $health -}}
{{- fail "config.server.tls is set: the kubelet's gRPC probe cannot do TLS; set config.server.health_port (and health_host: 0.0.0.0)" -}}
{{- end -}}
{{- $health -}}
{{- else -}}
{{- include "prunefusion.grpcPort" . -}}
{{- end -}}
{{- end -}}

{{/* The grpc.health.v1 service the startup and readiness probes ask for (probes.readinessService): "" (every
model loaded) or a service this config makes the server register (server/app.py: TextGeneration with a torch or
vllm model, Multimodal with a transfusion model, Embeddings with an onnx or torch-encoder model, QualityFilter unless quality.enabled is false); the server answers
NOT_FOUND for any other, and such a probe would never pass. */}}
{{- define "prunefusion.readinessService" -}}
{{- $want := .Values.probes.readinessService | default "" -}}
{{- if $want -}}
{{- $registered := list -}}
{{- range .Values.config.models -}}
{{- $engine := .engine | default "torch" -}}
{{- if eq $engine "transfusion" -}}
{{- $registered = append $registered "prunefusion.v1.Multimodal" -}}
{{- else if has $engine (list "onnx" "torch-encoder") -}}
{{- $registered = append $registered "prunefusion.v1.Embeddings" -}}
{{- else -}}
{{- $registered = append $registered "prunefusion.v1.TextGeneration" -}}
{{- end -}}
{{- end -}}
{{- if dig "enabled" true (.Values.config.quality | default dict) -}}
{{- $registered = append $registered "prunefusion.v1.QualityFilter" -}}
{{- end -}}
{{- if not (has $want $registered) -}}
{{- fail (printf "probes.readinessService %s: this config's server does not serve it (it serves %s); the probe would never pass" $want (join ", " ($registered | uniq))) -}}
{{- end -}}
{{- end -}}
{{- $want -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: above the server's whole SIGTERM path, drain_delay_seconds (still serving)
+ drain_seconds (in-flight requests finish) + 2 s (FLUSH_SECONDS in server/app.py: the streams' final chunks go
out), plus a margin for the engines' shutdown; the kubelet SIGKILLs at its end. */}}
{{- define "prunefusion.minGraceSeconds" -}}
{{- $s := include "prunefusion.server" . | fromJson -}}
{{- addf (dig "drain_delay_seconds" 2.0 $s) (dig "drain_seconds" 30.0 $s) 2.0 -}}
{{- end -}}

{{- define "prunefusion.terminationGracePeriodSeconds" -}}
{{- $min := include "prunefusion.minGraceSeconds" . | float64 -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- addf $min .Values.terminationGraceMarginSeconds | ceil | int -}}
{{- else -}}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $min -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.server.drain_delay_seconds + drain_seconds + 2 s flush (%v): the kubelet would SIGKILL the server mid-drain" .Values.terminationGracePeriodSeconds $min) -}}
{{- end -}}
{{- .Values.terminationGracePeriodSeconds | int -}}
{{- end -}}
{{- end -}}

{{- define "prunefusion.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "prunefusion.redisSecretName" -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "prunefusion.fullname" .)) -}}
{{- end -}}

{{/* The server config the ConfigMap holds: .Values.config, with the cache pointed at the external Redis as
${PRUNEFUSION_REDIS_URL} (the server expands ${VAR} in cache.url at start; the server container gets the variable
from the Secret) or, without one, the embedded Redis' data in the pod's /tmp (never on the shared volume). */}}
{{- define "prunefusion.serverConfig" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $cache := get $cfg "cache" | default dict -}}
{{- if include "prunefusion.redisEnabled" . -}}
{{- if get $cache "url" -}}
{{- fail "config.cache.url is set: give the external Redis as redis.url or redis.existingSecret instead (a Secret, not the ConfigMap)" -}}
{{- end -}}
{{- $_ := set $cache "url" "${PRUNEFUSION_REDIS_URL}" -}}
{{- else if not (hasKey $cache "data_dir") -}}
{{- $_ := set $cache "data_dir" "/tmp/prunefusion-redis" -}}
{{- end -}}
{{- $_ := set $cfg "cache" $cache -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The Pods' shared pieces: volumes (call with $), the env the server and the Job share. */}}
{{- define "prunefusion.homeVolume" -}}
- name: home
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "prunefusion.claimName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}

{{- define "prunefusion.env" -}}
- name: PRUNEFUSION_HOME
  value: {{ .Values.persistence.mountPath | quote }}
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
{{- end -}}
